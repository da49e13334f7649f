"""What a run tells people: progress bar, ``metrics.jsonl``, TensorBoard, evaluation, early stopping, summary.

Everything that prints or writes is active on rank 0 only; :func:`evaluate` is collective (every rank calls it).

``output_dir/metrics.jsonl`` holds one JSON object per line::

    {"kind": "train", "step": 10, "loss": 1.93, "task_loss": {"pandas": 1.8, ...}, "lr": 2e-4, "grad_norm": 0.7,
     "tokens_per_s": 5120.0, "peak_memory_gb": 3.1, ...}
    {"kind": "eval", "step": 10, "loss": 1.88, "task_loss": {...}, "task_perplexity": {...}, "best_step": 10}

TensorBoard (``output_dir/tb``) gets the same numbers as scalars: ``train/loss``, ``train/task_loss/pandas``, ...
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from mft_components.device import peak_memory_gb, to_device
from mft_components.distributed import all_reduce_sum, is_distributed
from mft_components.loss.task_weighted import task_loss_sums
from mft_components.models.parallelize import reshard

__all__ = [
    "MetricLogger",
    "ProgressBar",
    "EarlyStopping",
    "EvalResult",
    "NonFiniteLossError",
    "check_finite",
    "NonFiniteGuard",
    "evaluate",
    "Evaluator",
    "Throughput",
    "peak_memory_gb",
    "read_log_step",
    "format_summary",
]


class MetricLogger:
    """Appends metrics to ``output_dir/metrics.jsonl`` and TensorBoard (``output_dir/tb``); a no-op off rank 0.

    Args:
        output_dir: the run's output directory.
        enabled: False on ranks other than 0.
        tensorboard: also write TensorBoard events (skipped with a note when tensorboard is not installed).
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file (lines carry their step, so readers can dedupe).
        self._file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(output_dir / "tb"))
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        """Write one record. Nested dicts (per-task values) become ``kind/key/task`` TensorBoard scalars."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **metrics}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)) and v is not None:
                            self._tb.add_scalar(f"{kind}/{key}/{sub}", v, step)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class ProgressBar:
    """tqdm bar on rank 0 showing step, loss, learning rate and tokens/s; tqdm adds the ETA.

    Args:
        total_steps: optimizer steps of the whole run.
        initial: the step a resumed run starts from.
        enabled: False on ranks other than 0.
    """

    def __init__(self, total_steps: int, initial: int = 0, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout,
                             mininterval=0.5 if sys.stdout.isatty() else 10.0)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} tok/s {tokens_per_s:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, text: str) -> None:
        """Print a line above the bar (evaluations, checkpoints) without breaking it."""
        if self._bar is not None:
            self._bar.write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class EarlyStopping:
    """Tracks the best evaluation and stops after ``patience`` evaluations without improvement.

    Args:
        patience: evaluations without improvement before stopping; None never stops.
        min_delta: an improvement must beat the best by more than this.
        metric: what is tracked, in words (``validation loss``; ``pass@1`` when ``eval.code.select_by`` says so).
        higher_is_better: False for a loss, True for a pass rate.
    """

    patience: int | None = None
    min_delta: float = 0.0
    best_loss: float = math.inf  # the best value of `metric`
    best_step: int | None = None
    bad_evals: int = 0
    metric: str = "validation loss"
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        if self.higher_is_better and self.best_loss == math.inf:
            self.best_loss = -math.inf

    def update(self, step: int, loss: float) -> bool:
        """Record an evaluation (the value of `metric`); returns True when it is the new best."""
        if self.higher_is_better:
            better = loss > self.best_loss + self.min_delta
        else:
            better = loss < self.best_loss - self.min_delta
        if better:
            self.best_loss, self.best_step, self.bad_evals = loss, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_step, self.bad_evals = state["best_loss"], state["best_step"], state["bad_evals"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step and the tasks in the batch."""


def check_finite(loss: float, step: int, task_ids: Iterable[torch.Tensor], task_names: list[str],
                 grad_norm: float | None = None) -> None:
    """Raise :class:`NonFiniteLossError` when the loss or the gradient norm is NaN/inf.

    Both are global (all-reduced), so every rank decides alike. A finite loss can come with an inf gradient,
    which clipping would turn into NaN weights: checking the norm too keeps the last checkpoint finite.

    Args:
        loss: the step's global loss, auxiliary losses included.
        step: the 1-based optimizer step.
        task_ids: the ``task_ids`` tensors of this rank's micro-batches, to name the tasks involved.
        task_names: index -> task name.
        grad_norm: the global gradient norm before clipping.
    """
    bad = [f"training loss ({loss})"] if not math.isfinite(loss) else []
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append(f"gradient norm ({grad_norm})")
    if not bad:
        return
    present = sorted({int(t) for ids in task_ids for t in torch.unique(ids) if int(t) >= 0})
    names = ", ".join(task_names[t] for t in present) or "none"
    raise NonFiniteLossError(
        f"non-finite {' and '.join(bad)} at step {step}; tasks in this rank's batch: {names}. "
        "The optimizer step was skipped and the last checkpoint in output_dir is intact; try a lower optimizer.lr, "
        "dtype: fp32, or check these tasks' data."
    )


class NonFiniteGuard:
    """Keeps a non-finite loss or gradient norm out of the weights, and stops the run naming the step and tasks.

    Each step's flag (loss or global gradient norm not finite, on any rank) is computed where the model is. What
    happens then depends on the optimizer:

    * deferred: an optimizer that can skip an update on a device flag (fused Adam / AdamW, through the
      ``found_inf`` argument that ``GradScaler`` uses) gets the flag and leaves the weights and its own state
      untouched on a bad step, without the host reading anything. The host reads the flags in :meth:`check`
      (the recipe calls it at log steps and before every checkpoint) and raises for the first bad step since
      the last check. So no step waits for the device, and no checkpoint holds a non-finite weight.
    * immediate (any other optimizer, e.g. on the CPU where reading costs nothing): :meth:`update` reads the
      flag and raises before the optimizer step, as the recipe always did.

    Args:
        optimizer: the run's optimizer.
        task_names: index -> task name, for the message.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, task_names: list[str]):
        self.optimizer = optimizer
        self.task_names = task_names
        self.deferred = bool(getattr(optimizer, "defaults", {}).get("fused")) and isinstance(
            optimizer, (torch.optim.Adam, torch.optim.AdamW))
        self._first: torch.Tensor | None = None  # [step, loss, grad norm] of the first bad step, NaN while none
        self._tasks: dict[int, list[torch.Tensor]] = {}  # host task_ids of the steps since the last check

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, task_ids: list[torch.Tensor]) -> None:
        """Record step ``step`` (1-based) before its optimizer step; immediate mode raises here.

        Args:
            loss: this rank's step loss (``TaskWeightedLoss.step_loss``), on the device.
            grad_norm: the global gradient norm (``clip_grad_norm_``'s result), on the device.
            task_ids: the host ``task_ids`` tensors of this rank's micro-batches.

        Raises:
            NonFiniteLossError: immediate mode, the step is not finite.
        """
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        values = torch.stack([loss.detach().double().reshape(()), grad_norm.detach().double().reshape(()).to(loss.device)])
        bad = (~torch.isfinite(values)).any().double().reshape(1)
        all_reduce_sum(bad)  # every rank skips, or stops, alike
        if not self.deferred:
            if bad.item():
                loss_value, norm_value = values.tolist()
                check_finite(loss_value, step, task_ids, self.task_names, grad_norm=norm_value)
            return
        self._tasks[step] = task_ids
        record = torch.cat([to_device(torch.tensor([float(step)], dtype=torch.float64), values.device), values])
        if self._first is None:
            self._first = torch.full_like(record, math.nan)
        first_bad = (bad > 0) & torch.isnan(self._first[:1])
        self._first = torch.where(first_bad, record, self._first)
        self.optimizer.found_inf = (bad > 0).float().reshape(())  # the fused kernel skips the update when 1

    def pending(self, device: torch.device | str) -> torch.Tensor:
        """float64 ``[3]`` on ``device``: [step, loss, gradient norm] of the first non-finite step since the last
        check, NaN when none (or in immediate mode): for a caller that reads it back with other values at once."""
        if self._first is None:
            return torch.full((3,), math.nan, dtype=torch.float64, device=device)
        return self._first.to(device)

    def check(self, values: list[float] | None = None) -> None:
        """Raise for the first non-finite step since the last check (deferred mode; reads one small tensor, or
        takes ``values``: ``pending()`` as read back by the caller).

        Raises:
            NonFiniteLossError: naming that step, its loss and gradient norm, and the tasks in its micro-batches.
        """
        if self._first is None:
            return
        step, loss, grad_norm = values if values is not None else self._first.tolist()
        tasks, self._tasks = self._tasks, {}
        if math.isnan(step):
            return
        check_finite(loss, int(step), tasks.get(int(step), []), self.task_names, grad_norm=grad_norm)


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


class Throughput:
    """Tokens per second, over all ranks, between two calls of :meth:`rate`.

    Args:
        device: where the token count is all-reduced (the model's device: NCCL reduces CUDA tensors).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self._t, self._tokens = time.perf_counter(), 0
        self.device = torch.device(device)

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def add_step(self, micro_batches: list[dict]) -> None:
        """Count this rank's real (non-padding) tokens of a step; pass the micro-batches still on the host (no
        device is waited for). The count is reduced over ranks in :meth:`rate`."""
        self._tokens += sum(int((b["sample_ids"] >= 0).sum()) for b in micro_batches)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) is not training time: tokens/s leaves it out."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._t += time.perf_counter() - start

    @property
    def tokens(self) -> int:
        """This rank's real tokens since the last :meth:`rate`."""
        return self._tokens

    def rate(self, total_tokens: int | None = None) -> float:
        """Real tokens per second of all ranks since the last call (collective: every rank calls it, unless it
        passes ``total_tokens``, :attr:`tokens` already summed over the ranks)."""
        tokens = self._tokens if total_tokens is None else int(total_tokens)
        if total_tokens is None and is_distributed():
            tokens = int(all_reduce_sum(torch.tensor([tokens], device=self.device)).item())
        now = time.perf_counter()
        rate = tokens / max(now - self._t, 1e-9)
        self._t, self._tokens = now, 0
        return rate


def read_log_step(loss_fn: Any, grad_norm: torch.Tensor, guard: NonFiniteGuard, throughput: Throughput,
                  group=None) -> dict[str, float]:
    """Everything a log step reports, with one all-reduce and one device-to-host copy (collective).

    The loss's per-task sums and this rank's token count are summed over ranks together; with the step's task
    token counts, the global gradient norm and the non-finite guard's record they come back in one ``tolist()``,
    the only point of the step where the host waits for the device.

    Returns:
        ``loss_fn.step_metrics()``'s values plus ``grad_norm`` and ``tokens_per_s``.

    Raises:
        NonFiniteLossError: a step since the last check was not finite (``guard.check``).
    """
    sums = loss_fn.step_sums()
    device = sums.device
    summed = all_reduce_sum(torch.cat([sums, to_device(torch.tensor([float(throughput.tokens)], dtype=torch.float64),
                                                       device)]), group)
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    counts = loss_fn.step_token_counts()
    values = torch.cat([summed, counts, norm.detach().double().reshape(1).to(device), guard.pending(device)]).tolist()
    n_sums, n_counts = sums.numel(), counts.numel()
    guard.check(values[-3:])
    metrics = loss_fn.step_metrics(values=values[:n_sums] + values[n_sums + 1:n_sums + 1 + n_counts])
    metrics["grad_norm"] = values[n_sums + 1 + n_counts]
    metrics["tokens_per_s"] = throughput.rate(total_tokens=int(values[n_sums]))
    return metrics


def format_summary(*, steps: int, seconds: float, stop_reason: str, early_stopping: EarlyStopping,
                   best_eval: EvalResult | None, checkpoints: list[Path], output_dir: str | os.PathLike,
                   best_task_values: dict[str, float] | None = None) -> str:
    """The lines printed when a run ends: steps, time, why it stopped, best step and its per-task values: the
    validation losses of ``best_eval``, or ``best_task_values`` (per-task values of ``early_stopping.metric``,
    e.g. pass@1, when that decides the best step instead of the loss)."""
    lines = [f"finished: {steps} steps in {seconds:.0f}s ({stop_reason})"]
    if early_stopping.best_step is not None:
        lines.append(f"best step: {early_stopping.best_step} ({early_stopping.metric} {early_stopping.best_loss:.4f})")
    if best_task_values is not None:
        width = max(map(len, best_task_values), default=4)
        lines += [f"  {task:<{width}}  {early_stopping.metric} {value:.4f}" for task, value in best_task_values.items()]
    if best_eval is not None:
        width = max(map(len, best_eval.task_loss), default=4)
        for task, loss in best_eval.task_loss.items():
            lines.append(f"  {task:<{width}}  loss {loss:.4f}  ppl {math.exp(min(loss, 50.0)):.2f}")
    lines.append(f"checkpoints: {', '.join(p.name for p in checkpoints) or 'none'} in {output_dir}")
    lines.append(f"metrics: {Path(output_dir) / 'metrics.jsonl'}, TensorBoard: {Path(output_dir) / 'tb'}")
    return "\n".join(lines)


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
        improved = track and self.early_stopping.update(step, result.loss)
        if improved:
            self.best = result
        if track:
            self.last = (step, result)
        else:
            self.reference = result
        self.logger.log("eval", step, {**result.to_dict(), "best_step": self.early_stopping.best_step})
        per_task = "  ".join(f"{t} {v:.3f}" for t, v in result.task_loss.items())
        self.progress.write(f"step {step} eval loss {result.loss:.4f}{' (best)' if improved else ''}: {per_task}")
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
