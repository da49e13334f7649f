"""What stops a run, or keeps it from saving what it should not: early stopping, and the non-finite guard.

``EarlyStopping`` tracks the best evaluation (the validation loss, or the pass rate ``eval.code.select_by``
names) and stops after ``patience`` evaluations without a new best. ``NonFiniteGuard`` keeps a NaN or infinite
loss or gradient norm out of the weights and stops the run naming the step and the tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from mft_components.device import to_device
from mft_components.distributed import all_reduce_sum

__all__ = ["EarlyStopping", "NonFiniteLossError", "check_finite", "NonFiniteGuard"]


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
