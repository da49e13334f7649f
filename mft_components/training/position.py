"""Where the training loop is (step, epoch, step in epoch), and the micro-batches of each optimizer step.

    position = TrainingPosition(train_loader, gradient_accumulation_steps, epochs=..., max_steps=...)
    for host_batches in position.steps(stop=lambda: early_stopping.should_stop):
        ...                        # one optimizer step over this rank's micro-batches
        position.advance()         # the step is done: step += 1, step_in_epoch += 1 (what a checkpoint saves)

``steps`` walks the epochs: it sets each epoch on the sampler, creates the epoch's iterator and yields
``gradient_accumulation_steps`` micro-batches per optimizer step, until ``total_steps`` (``max_steps``, or the sum
of the epochs' lengths from the sampler's plan) or ``stop()``.

A resumed run (``restore``) continues exactly where the run that saved the checkpoint was, RNG included:

* mid-epoch: the loader takes its saved position (the sampler skips the micro-batches already trained), then the
  RNG streams are put back as saved, AFTER the epoch's iterator is created (creating one draws from torch's RNG);
* at the end of an epoch (the saved one was complete): the next epoch starts from its beginning, with the RNG as
  saved put back BEFORE its iterator is created, as it was in the run that saved.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from mft_components.training.state import restore_rng_state

__all__ = ["TrainingPosition"]


class TrainingPosition:
    """The loop's position in the run, and this rank's micro-batches of each optimizer step.

    Args:
        loader: the training loader (``data.sampling.build_train_loader``); its sampler's plan gives each epoch's
            number of optimizer steps.
        gradient_accumulation_steps: micro-batches per rank per optimizer step.
        epochs: passes over the data (when ``max_steps`` is None).
        max_steps: optimizer steps of the run, or None for ``epochs`` passes.
    """

    def __init__(self, loader, gradient_accumulation_steps: int, *, epochs: int, max_steps: int | None):
        self.loader = loader
        self.gas = gradient_accumulation_steps
        self.plan = loader.sampler.plan
        self.total_steps = max_steps or sum(self.plan.steps_per_epoch(e) for e in range(epochs))
        self.step = self.epoch = self.step_in_epoch = 0
        self._resume: dict[str, Any] | None = None  # this rank's saved loader position and RNG, until applied

    def restore(self, step: int, epoch: int, step_in_epoch: int, rank_state: dict[str, Any]) -> None:
        """Continue from a checkpoint: its position, and this rank's ``{"dataloader", "rng"}`` (applied by
        ``steps`` when it starts the epoch, see the module docstring)."""
        self.step, self.epoch, self.step_in_epoch = step, epoch, step_in_epoch
        self._resume = rank_state

    def steps(self, stop: Callable[[], bool]) -> Iterator[list[dict]]:
        """This rank's micro-batches (host batch dicts) of each optimizer step, until ``total_steps`` or ``stop()``.
        Call :meth:`advance` after each step."""
        while self.step < self.total_steps and not stop():
            if self.step_in_epoch >= self.plan.steps_per_epoch(self.epoch):  # the (saved) epoch is complete
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self._restore_rng()  # resumed at the boundary: BEFORE the new epoch's iter() draws from it
            batches = self._epoch_batches()
            while self.step_in_epoch < self.plan.steps_per_epoch(self.epoch) and self.step < self.total_steps:
                yield [next(batches) for _ in range(self.gas)]

    def advance(self) -> None:
        """One optimizer step is done."""
        self.step += 1
        self.step_in_epoch += 1

    @property
    def epoch_end(self) -> bool:
        """The step just done was the last of its epoch."""
        return self.step_in_epoch == self.plan.steps_per_epoch(self.epoch)

    def _epoch_batches(self) -> Iterator[dict]:
        self.loader.sampler.set_epoch(self.epoch)
        if self._resume is not None:  # mid-epoch resume: continue where the checkpoint stopped
            self.loader.load_state_dict(self._resume["dataloader"])
        batches = iter(self.loader)
        self._restore_rng()  # after iter(): creating an iterator draws from the RNG
        return batches

    def _restore_rng(self) -> None:
        if self._resume is not None:
            restore_rng_state(self._resume["rng"])
            self._resume = None
