"""Validation of preference tuning: per task, the preference loss, reward accuracy, margin, rewards and log-probs
of the held-out pairs, with the ``Evaluator``'s bookkeeping (when, best step, early stopping on the mean of the
task losses, logging).

``evaluate_preference`` is collective (every rank calls it; FSDP2's forward is).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from mft_components.distributed import all_reduce_sum, is_distributed
from mft_components.loss.preference import METRICS, PreferenceLoss, summarise
from mft_components.models.parallelize import reshard
from mft_components.training.evaluate import EvalResult, Evaluator

__all__ = ["evaluate_preference", "PreferenceEvaluator"]


@torch.no_grad()
def evaluate_preference(model, batches: list[dict], loss_fn: PreferenceLoss, device: torch.device,
                        reference: Callable[[dict, str], torch.Tensor | None]) -> tuple[EvalResult, dict]:
    """The preference metrics over this rank's validation batches, summed over ranks.

    Args:
        model: the ``MFTModel``.
        batches: this rank's validation micro-batches on the host (``collate_pairs`` output).
        loss_fn: the run's loss (its settings; its training metrics are left alone).
        device: where the batches go.
        reference: ``(prepared batch, split) -> [P, 2]`` reference log-probs, or None for orpo / simpo.

    Returns:
        (``EvalResult`` with ``loss`` the mean of the task losses, ``token_loss`` the mean over pairs,
        ``task_loss`` per task and ``task_tokens`` the pairs per task; every metric of ``summarise``).
    """
    from mft_components.models import prepare_batch  # models imports this module's neighbours, not this module

    was_training = model.training
    model.eval()
    k = len(loss_fn.task_names)
    n = len(batches)
    if is_distributed():
        n_all = torch.tensor([n], device=device)
        dist.all_reduce(n_all, op=dist.ReduceOp.MAX)
        n = int(n_all.item())
    sums = torch.zeros(len(METRICS), k, dtype=torch.float64, device=device)
    pairs = torch.zeros(k, dtype=torch.float64, device=device)
    for i in range(n):
        host = batches[min(i, len(batches) - 1)]
        if i >= len(batches):  # padding pass for FSDP's collective forward: the same shapes, no pair counted
            host = {**host, "labels": torch.full_like(host["labels"], -100),
                    "pair_task_ids": host["pair_task_ids"][:0], "pair_index": host["pair_index"][:0]}
        batch = prepare_batch(host, device, model.config)
        ref = reference(batch, "valid")
        token_losses, _ = model(batch, **loss_fn.ce_kwargs)
        sums += loss_fn.pair_losses_and_metrics(token_losses, batch, ref)[1]
        pairs += torch.bincount(host["pair_task_ids"], minlength=k)[:k].to(device, torch.float64)
    if is_distributed():
        all_reduce_sum(sums)
        all_reduce_sum(pairs)
        reshard(model)
    model.train(was_training)
    sums, pairs = sums.cpu(), pairs.cpu()
    metrics = summarise(math.nan, sums, pairs, loss_fn.task_names)
    task_loss = {t: metrics[f"loss/{t}"] for t in loss_fn.task_names if f"loss/{t}" in metrics}
    total = float(pairs.sum())
    result = EvalResult(loss=sum(task_loss.values()) / len(task_loss) if task_loss else math.nan,
                        token_loss=float(sums[0].sum()) / total if total else math.nan, task_loss=task_loss,
                        task_tokens={t: int(pairs[i]) for i, t in enumerate(loss_fn.task_names) if pairs[i] > 0})
    metrics["loss"] = result.loss
    return result, metrics


class PreferenceEvaluator(Evaluator):
    """``Evaluator`` over held-out pairs: logs every preference metric per task; the best step and early stopping
    follow the mean of the per-task preference losses.

    Args (besides ``Evaluator``'s): loss_fn, the run's ``PreferenceLoss``; reference, as ``evaluate_preference``.
    """

    def __init__(self, *args, loss_fn: PreferenceLoss, reference: Callable, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn, self.reference_fn = loss_fn, reference

    def run(self, model, step: int, track: bool = True) -> bool:
        result, metrics = evaluate_preference(model, self.valid_batches, self.loss_fn, self.device,
                                              self.reference_fn)
        improved = self.record(step, result, track)
        self.logger.log("eval", step, {**metrics, "best_step": self.early_stopping.best_step})
        per_task = "  ".join(f"{t} acc {metrics.get(f'accuracy/{t}', math.nan):.2f}" for t in result.task_loss)
        self.progress.write(f"step {step} eval loss {result.loss:.4f} reward accuracy "
                            f"{metrics.get('accuracy', math.nan):.3f}{' (best)' if improved else ''}: {per_task}")
        return improved
