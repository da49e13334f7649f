"""Validation: per-task loss and perplexity over the whole validation split, and the recipe's bookkeeping of it.

:func:`evaluate` is collective (every rank calls it; FSDP2's forward is); the ``Evaluator`` decides when to run it,
logs it (``metrics.py``), feeds early stopping (``guards.py``) and CoBa's validation losses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist

from mft_components.distributed import all_reduce_sum, is_distributed
from mft_components.loss.task_weighted import task_loss_sums
from mft_components.models.parallelize import reshard
from mft_components.training.guards import EarlyStopping
from mft_components.training.metrics import MetricLogger, ProgressBar

__all__ = ["EvalResult", "evaluate", "Evaluator"]


@dataclass
class EvalResult:
    """Validation losses: ``loss`` (the mean of the task losses, the early-stopping criterion), ``token_loss``
    (mean over all tokens), per-task token-mean losses and perplexities, and loss tokens per task."""

    loss: float
    token_loss: float
    task_loss: dict[str, float]
    task_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def task_perplexity(self) -> dict[str, float]:
        return {t: math.exp(min(v, 50.0)) for t, v in self.task_loss.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "token_loss": self.token_loss, "perplexity": math.exp(min(self.token_loss, 50.0)),
                "task_loss": self.task_loss, "task_perplexity": self.task_perplexity, "task_tokens": self.task_tokens}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[dict], task_names: list[str], device: torch.device,
             forward_kwargs: dict | None = None) -> EvalResult:
    """Per-task validation loss (token-mean per task) over the whole validation split, summed over ranks.

    Collective: every rank calls it. A rank that runs out of batches before the others keeps stepping with an
    all-padding copy of its last batch, because FSDP's forward is itself collective. Each batch goes through the
    training path's ``prepare_batch`` (loss positions and attention boundaries from the host copy), so no batch
    makes the host wait for the device; the sums are read back once, at the end.

    Args:
        model: the ``MFTModel`` (``forward(batch) -> (token_losses, aux)``, ``config``).
        loader: this rank's validation batches, on the host (collator output).
        task_names: index -> task name.
        device: where the batches go.

    Returns:
        An :class:`EvalResult`; tasks without validation tokens are left out.
    """
    from mft_components.models import prepare_batch  # models imports this module's neighbours, not this module

    was_training = model.training
    model.eval()
    sums = torch.zeros(len(task_names), dtype=torch.float64, device=device)
    counts = torch.zeros(len(task_names), dtype=torch.float64, device=device)
    batches = list(loader)
    n = len(batches)
    if is_distributed():
        n_all = torch.tensor([n], device=device)
        dist.all_reduce(n_all, op=dist.ReduceOp.MAX)
        n = int(n_all.item())
    for i in range(n):
        if not batches:
            raise RuntimeError("evaluate: this rank got no validation batch while others did; the validation "
                               "loader must give every rank at least one (possibly all-padding) batch")
        host = batches[min(i, len(batches) - 1)]
        if i >= len(batches):  # padding pass: same shapes, no loss tokens
            host = {**host, "labels": torch.full_like(host["labels"], -100)}
        # as in training: loss positions and attention boundaries from the host copy, so nothing is read back
        batch = prepare_batch(host, device, model.config)
        token_losses, _ = model(batch, **(forward_kwargs or {}))
        batch_sums, batch_counts = task_loss_sums(token_losses, batch, len(task_names))
        sums += batch_sums
        counts += batch_counts.to(counts)
    if is_distributed():
        all_reduce_sum(sums)
        all_reduce_sum(counts)
        reshard(model)
    model.train(was_training)
    values = torch.cat([sums, counts]).tolist()  # the evaluation's one device-to-host copy
    k = len(task_names)
    sums_host, counts_host = values[:k], values[k:]
    task_loss = {name: sums_host[i] / counts_host[i] for i, name in enumerate(task_names) if counts_host[i] > 0}
    total = sum(counts_host)
    return EvalResult(
        loss=sum(task_loss.values()) / max(1, len(task_loss)) if task_loss else math.nan,
        token_loss=sum(sums_host) / total if total > 0 else math.nan,
        task_loss=task_loss,
        task_tokens={name: int(counts_host[i]) for i, name in enumerate(task_names) if counts_host[i] > 0},
    )


class Evaluator:
    """The recipe's evaluation bookkeeping: when to evaluate, the best step, early stopping, CoBa's inputs.

    Args:
        valid_batches: this rank's validation micro-batches (materialised once; evaluation is deterministic).
        task_names: index -> task name.
        device: where batches go.
        eval_every_n_steps: evaluate every N steps; None evaluates at the end of each epoch.
        early_stopping: the :class:`EarlyStopping` tracker (its state is part of the recipe state).
        logger, progress: where results are written (rank 0).
        forward_kwargs: keyword arguments of the model's forward (``TaskWeightedLoss.ce_kwargs``), so validation
            losses are computed as training losses are.
    """

    def __init__(self, valid_batches: list[dict], task_names: list[str], device: torch.device,
                 eval_every_n_steps: int | None, early_stopping: EarlyStopping, logger: MetricLogger,
                 progress: ProgressBar, forward_kwargs: dict | None = None):
        self.valid_batches = valid_batches
        self.task_names = task_names
        self.device = device
        self.every = eval_every_n_steps
        self.early_stopping = early_stopping
        self.logger, self.progress = logger, progress
        self.forward_kwargs = forward_kwargs
        self.best: EvalResult | None = None
        self.last: tuple[int, EvalResult] | None = None
        self.reference: EvalResult | None = None  # the evaluation before training (track=False)

    def due(self, step: int, epoch_end: bool) -> bool:
        if not self.valid_batches:
            return False
        return step % self.every == 0 if self.every else epoch_end

    def evaluated(self, step: int) -> bool:
        return not self.valid_batches or (self.last is not None and self.last[0] == step)

    def run(self, model: torch.nn.Module, step: int, track: bool = True) -> bool:
        """Evaluate the whole validation split (collective), log it; returns True on a new best.

        ``track=False`` logs without feeding early stopping: the evaluation before training is a reference point,
        not a candidate for the best checkpoint (there is no checkpoint of step 0).
        """
        result = evaluate(model, self.valid_batches, self.task_names, self.device, self.forward_kwargs)
        improved = self.record(step, result, track)
        self.logger.log("eval", step, {**result.to_dict(), "best_step": self.early_stopping.best_step})
        per_task = "  ".join(f"{t} {v:.3f}" for t, v in result.task_loss.items())
        self.progress.write(f"step {step} eval loss {result.loss:.4f}{' (best)' if improved else ''}: {per_task}")
        return improved

    def record(self, step: int, result, track: bool) -> bool:
        """Early stopping, ``best`` and ``last`` (or, untracked, the step-0 ``reference``) for a finished
        evaluation; True on a new best. Shared by the evaluators of every recipe."""
        improved = track and self.early_stopping.update(step, result.loss)
        if improved:
            self.best = result
        if track:
            self.last = (step, result)
        else:
            self.reference = result
        return improved

    def state_dict(self) -> dict[str, Any]:
        """The best and the last evaluation and the tracker of the best, so a resumed run reports and compares
        them as the run that saved did (plain values: weights_only-safe). The tracker is the recipe's early
        stopping, or, when ``eval.code.select_by`` follows a pass rate, one of the evaluator's own that is saved
        nowhere else."""
        return {"best": asdict(self.best) if self.best else None,
                "last": [self.last[0], asdict(self.last[1])] if self.last else None,
                "early_stopping": self.early_stopping.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.best = EvalResult(**state["best"]) if state.get("best") else None
        self.last = (state["last"][0], EvalResult(**state["last"][1])) if state.get("last") else None
        if state.get("early_stopping"):
            self.early_stopping.load_state_dict(state["early_stopping"])

    def update_coba(self, model: torch.nn.Module, loss_fn: Any, step: int) -> None:
        """Feed CoBa per-task losses of ``loss_fn.coba_sample_valid_num`` validation micro-batches.

        The micro-batches are picked by step (no iterator state), so a resumed run picks the same ones.
        """
        if not (self.valid_batches and loss_fn.coba_due(step)):
            return
        n, k = len(self.valid_batches), loss_fn.coba_sample_valid_num
        picks = [self.valid_batches[(step * k + i) % n] for i in range(k)]
        loss_fn.update_coba(step, evaluate(model, picks, self.task_names, self.device, self.forward_kwargs).task_loss)
