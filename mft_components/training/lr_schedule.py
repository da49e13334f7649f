"""Learning-rate schedule: linear warmup, then cosine decay floored at ``min_lr``.

::

    lr
    base ┤      ╭──╮
         │     ╱    ╲___
         │    ╱         ╲___
         │   ╱              ╲___
    min  ┤  ╱                   ╲______   <- never below min_lr after warmup
         └──┴──────────────────────────── step
            warmup                 total

Config (``lr_scheduler:`` node)::

    lr_scheduler:
      _component_: mft_components.training.lr_schedule.cosine_with_warmup
      warmup_steps: 0.03      # int: optimizer steps; float < 1: fraction of the run
      min_lr: 1.0e-6

The recipe supplies the runtime arguments ``optimizer`` and ``num_training_steps``.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["cosine_with_warmup", "resolve_warmup_steps", "lr_factor"]


def resolve_warmup_steps(warmup_steps: int | float, num_training_steps: int) -> int:
    """Turn ``warmup_steps`` (a step count, or a fraction of the run when a float below 1) into steps.

    Args:
        warmup_steps: an int >= 0 (optimizer steps) or a float in [0, 1) (fraction of ``num_training_steps``).
        num_training_steps: total optimizer steps of the run.

    Returns:
        The number of warmup steps, an int in [0, num_training_steps].

    Raises:
        ValueError: on a negative value.
    """
    if isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"lr_scheduler.warmup_steps: expected an int >= 0 or a fraction in [0, 1), got {warmup_steps!r}")
    if isinstance(warmup_steps, float) and warmup_steps < 1:
        steps = int(round(warmup_steps * num_training_steps))
    else:
        steps = int(warmup_steps)
    return min(steps, num_training_steps)


def lr_factor(step: int, *, warmup: int, num_training_steps: int, floor: float) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warmup rises linearly as ``(step + 1) / warmup`` so that the first step already learns (HF's ``step / warmup``
    wastes step 0 on lr 0); then ``floor + (1 - floor) * (1 + cos(pi * progress)) / 2`` with ``progress`` going from 0 at the
    end of warmup to 1 at the last step, which so runs at exactly ``min_lr``.

    Args:
        step: 0-based optimizer step.
        warmup: warmup steps.
        num_training_steps: total steps.
        floor: ``min_lr / base_lr``.

    Returns:
        The factor, in [0, 1].
    """
    if step < warmup:
        return (step + 1) / warmup
    # the last step (num_training_steps - 1) lands exactly on the floor
    decay_steps = max(1, num_training_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _WarmupCosineLR(LambdaLR):
    """``LambdaLR`` whose ``load_state_dict`` also puts the restored learning rate into the optimizer's groups.

    Building a scheduler writes the step-0 lr into the groups; without this, resuming would train the first
    resumed step at that lr unless the optimizer state happened to be loaded after the scheduler was built.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def cosine_with_warmup(
    optimizer: Optimizer,
    num_training_steps: int,
    *,
    warmup_steps: int | float = 0,
    min_lr: float = 0.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Linear warmup then cosine decay to ``min_lr`` (absolute, per parameter group).

    Args:
        optimizer: the optimizer whose groups' ``lr`` is the peak learning rate.
        num_training_steps: total optimizer steps of the run (runtime argument from the recipe).
        warmup_steps: int steps or a float fraction in [0, 1) of ``num_training_steps``.
        min_lr: the learning rate the decay ends at; a group whose peak lr is below it stays at its peak.
        last_epoch: as in ``torch.optim.lr_scheduler``; leave -1 and restore with ``load_state_dict`` on resume.

    Returns:
        A ``LambdaLR`` (its ``state_dict`` holds only numbers, safe for ``torch.load(weights_only=True)``).

    Raises:
        ValueError: on a non-positive ``num_training_steps`` or a negative ``min_lr`` / ``warmup_steps``.
    """
    if num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be > 0, got {num_training_steps}")
    if min_lr < 0:
        raise ValueError(f"lr_scheduler.min_lr: expected >= 0, got {min_lr}")
    warmup = resolve_warmup_steps(warmup_steps, num_training_steps)

    def make(base_lr: float):
        floor = min(1.0, min_lr / base_lr) if base_lr > 0 else 0.0
        return lambda step: lr_factor(step, warmup=warmup, num_training_steps=num_training_steps, floor=floor)

    lambdas = [make(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
    return _WarmupCosineLR(optimizer, lambdas, last_epoch=last_epoch)
