"""Task-balanced, distributed, resumable sampling of packed rows.

Public entry points, over the dataset the data build made (``dataset.MFTData``: its samples, ``seq_len``,
``packing``, ``task_sampling``, ``temperature``, ``seed``, ``pad_id``)::

    build_train_loader(data, *, micro_batch_size, gradient_accumulation_steps=1, rank=0, world_size=1,
                       num_workers=0, pin_memory=False) -> StatefulDataLoader
    build_valid_loader(data, *, micro_batch_size, rank=0, world_size=1, num_workers=0,
                       pin_memory=False) -> StatefulDataLoader

Both loaders yield the batch dicts of ``packing.collate`` (CONTRACT.md, "Batch format"). Each epoch of the train
loader is built in four deterministic steps that depend on ``seed`` and the epoch only, never on the world size::

    1. order   draw the epoch's sample sequence (task_sampling):
                 proportional  every sample exactly once, shuffled
                 uniform       N draws (N = number of samples), each picks a task with probability 1/#tasks
                 temperature   N draws, task t with probability ~ size_t ** (1 / T)   (T=1: proportional in
                               expectation; T -> inf: uniform)
               a task drawn more often than its size repeats its samples in reshuffled passes, so every sample
               of a task is used before any is used twice.
    2. pack    pack_samples over that sequence (best-fit decreasing), then shuffle the rows (BFD emits long
               samples first; without the shuffle early steps would see only long samples)
    3. steps   global batch G = world_size * gradient_accumulation_steps * micro_batch_size rows; optimizer step
               s owns rows [s*G, (s+1)*G); the last step is filled up with all-padding rows (never duplicates)
    4. ranks   micro-batch j (0..gas-1) of step s on rank r takes the micro_batch_size rows starting at
               s*G + (j*world_size + r)*micro_batch_size

              step s: rows s*G ...                                       ... (s+1)*G - 1
              +---------+---------+---------+---------+---------+---------+
    2 ranks   | r0 mb0  | r1 mb0  | r0 mb1  | r1 mb1  | r0 mb2  | r1 mb2  |     (gas=3, micro_batch_size=2)
              +---------+---------+---------+---------+---------+---------+

So the set of rows of an optimizer step is the same for 1x4, 2x2 and 4x1 (ranks x micro-batches) splits of the
same global batch, every rank runs ``steps * gradient_accumulation_steps`` micro-batches per epoch, and each row
is seen by one rank only.

Epochs and resume: call ``loader.sampler.set_epoch(epoch)`` before iterating each epoch (the sampler yields
``(epoch, micro_batch_index)`` keys and the dataset builds the batch for a key, so worker processes need no
shared state). ``loader.state_dict()`` / ``load_state_dict()`` (torchdata's ``StatefulDataLoader``) carry the
sampler's ``{"epoch", "yielded", layout}``: a loader restored from a mid-epoch state yields exactly the remaining
micro-batches of that epoch. If the recipe calls ``set_epoch`` with a different epoch than the saved one (the
saved epoch was complete and the recipe moved on), the explicit epoch wins and starts from its beginning.
A state saved at an optimizer-step boundary can be resumed with another ranks x micro-batches split of the same
global batch size.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from mft_components.data.dataset import MFTData, Sample
from mft_components.data.packing import collate, pack_lengths
from mft_components.data.records import DataError

# StatefulDataLoader (torchdata 0.11) calls torch.set_vital, which torch has deprecated: a warning on every loader
# built, about torchdata's own code. Only that one, only from torchdata.
warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated", category=UserWarning,
                        module=r"torchdata\.stateful_dataloader")

__all__ = [
    "TASK_SAMPLING_MODES",
    "check_task_sampling",
    "task_probabilities",
    "epoch_order",
    "micro_batch_rows",
    "RowPlan",
    "MicroBatchSampler",
    "MicroBatchDataset",
    "build_train_loader",
    "build_valid_loader",
    "LoaderStateError",
]

TASK_SAMPLING_MODES = ("proportional", "uniform", "temperature")


def check_task_sampling(task_sampling: str, temperature: float | None) -> None:
    """Raise DataError unless ``task_sampling`` is one of ``TASK_SAMPLING_MODES`` and, for ``temperature``, the
    temperature a number > 0 (config keys ``data.task_sampling``, ``data.temperature``)."""
    if task_sampling not in TASK_SAMPLING_MODES:
        raise DataError(f"data.task_sampling: expected one of {TASK_SAMPLING_MODES}, got {task_sampling!r}")
    if task_sampling == "temperature" and (temperature is None or not float(temperature) > 0):
        raise DataError(
            f"data.temperature: task_sampling 'temperature' needs a number > 0 (1 = proportional, larger "
            f"flattens towards uniform), got {temperature!r}"
        )


def task_probabilities(
    task_sizes: Sequence[int], task_sampling: str = "proportional", temperature: float | None = None
) -> np.ndarray:
    """Probability of drawing each task under a ``task_sampling`` mode.

    Args:
        task_sizes: number of samples of each task (a task of size 0 is never drawn).
        task_sampling: ``proportional`` (p ~ size), ``uniform`` (p equal over non-empty tasks) or
            ``temperature`` (p ~ size ** (1 / temperature)); config key ``data.task_sampling``.
        temperature: T > 0 for ``temperature`` mode (config key ``data.temperature``).

    Returns:
        np.ndarray: float64 probabilities summing to 1 (all zeros when every task is empty).

    Raises:
        ValueError: unknown mode, or ``temperature`` mode without a positive temperature (``check_task_sampling``).
    """
    check_task_sampling(task_sampling, temperature)
    sizes = np.asarray(task_sizes, dtype=np.float64)
    if task_sampling == "proportional":
        weights = sizes
    elif task_sampling == "uniform":
        weights = (sizes > 0).astype(np.float64)
    else:
        weights = np.where(sizes > 0, sizes ** (1.0 / float(temperature)), 0.0)
    total = weights.sum()
    return weights / total if total > 0 else weights


class LoaderStateError(ValueError):
    """A saved loader position this loader cannot continue from (another global batch, or mid-step)."""


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    # One independent stream per (seed, epoch, purpose): drawing the order never shifts the row shuffle.
    return np.random.default_rng([int(seed), int(epoch), stream])


def epoch_order(
    task_ids: np.ndarray,
    num_tasks: int,
    *,
    task_sampling: str = "proportional",
    temperature: float | None = None,
    seed: int = 42,
    epoch: int = 0,
) -> np.ndarray:
    """The sequence of sample indices drawn for one epoch (step 1 of the module docstring).

    Args:
        task_ids: task index of each sample.
        num_tasks: number of tasks (``len(task_names)``).
        task_sampling: ``proportional``, ``uniform`` or ``temperature``.
        temperature: for ``temperature`` mode.
        seed: data seed.
        epoch: epoch number.

    Returns:
        np.ndarray: int64 sample indices, ``len(task_ids)`` of them; a permutation in ``proportional`` mode.

    Raises:
        ValueError: as ``task_probabilities``; a task id outside ``0..num_tasks-1``.
    """
    task_ids = np.asarray(task_ids, dtype=np.int64)
    n = len(task_ids)
    if n and (task_ids.min() < 0 or task_ids.max() >= num_tasks):
        raise ValueError(f"sample task ids must lie in 0..{num_tasks - 1} (len(task_names)); got {task_ids.max()}")
    sizes = np.bincount(task_ids, minlength=num_tasks)
    probs = task_probabilities(sizes, task_sampling, temperature)
    rng = _rng(seed, epoch, 0)
    if task_sampling == "proportional":
        return rng.permutation(n).astype(np.int64)
    slots_task = rng.choice(num_tasks, size=n, p=probs) if n else np.zeros(0, dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    for t in range(num_tasks):
        slots = np.flatnonzero(slots_task == t)
        if not len(slots):
            continue
        pool = np.flatnonzero(task_ids == t)
        passes = -(-len(slots) // len(pool))
        order[slots] = np.concatenate([rng.permutation(pool) for _ in range(passes)])[: len(slots)]
    return order


def micro_batch_rows(
    num_rows: int, *, micro_batch_size: int, gradient_accumulation_steps: int, rank: int, world_size: int
) -> np.ndarray:
    """Which global rows each of this rank's micro-batches takes (steps 3 and 4 of the module docstring).

    Args:
        num_rows: rows in the epoch.
        micro_batch_size: rows per micro-batch.
        gradient_accumulation_steps: micro-batches per rank per optimizer step.
        rank: this rank.
        world_size: number of ranks.

    Returns:
        np.ndarray: int64 ``[num_micro_batches, micro_batch_size]`` row indices, -1 for an all-padding row;
        ``num_micro_batches = ceil(num_rows / G) * gradient_accumulation_steps`` with
        ``G = world_size * gradient_accumulation_steps * micro_batch_size``, the same on every rank.

    Raises:
        ValueError: a non-positive size, or ``rank`` outside ``0..world_size-1``.
    """
    if micro_batch_size < 1 or gradient_accumulation_steps < 1 or world_size < 1:
        raise ValueError(
            "micro_batch_size, gradient_accumulation_steps and world_size must be >= 1, got "
            f"{micro_batch_size}, {gradient_accumulation_steps}, {world_size}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    g = world_size * gradient_accumulation_steps * micro_batch_size
    steps = -(-num_rows // g)
    k = np.arange(steps * gradient_accumulation_steps)
    step, j = k // gradient_accumulation_steps, k % gradient_accumulation_steps
    start = step * g + (j * world_size + rank) * micro_batch_size
    rows = start[:, None] + np.arange(micro_batch_size)[None, :]
    return np.where(rows < num_rows, rows, -1).astype(np.int64)


class RowPlan:
    """The rows of every epoch and this rank's share of them (steps 1-4 of the module docstring).

    Cheap to pickle (lengths and task ids only; no tokens) and deterministic, so each DataLoader worker can rebuild
    the plan of an epoch by itself. The last epoch's plan is cached.

    Args:
        lengths: token count of each sample.
        task_ids: task index of each sample.
        num_tasks: ``len(task_names)``.
        seq_len: row capacity (``data.seq_len``).
        packing: ``pack`` or ``padding``.
        task_sampling: ``proportional``, ``uniform`` or ``temperature``.
        temperature: for ``temperature`` mode.
        seed: data seed.
        shuffle: False for validation: samples in their given order, rows in packing order, same every epoch.
        micro_batch_size, gradient_accumulation_steps, rank, world_size: the layout (``micro_batch_rows``).

    Raises:
        ValueError: invalid mode, temperature, layout, or a sample longer than ``seq_len``.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        task_ids: np.ndarray,
        num_tasks: int,
        *,
        seq_len: int,
        packing: str = "pack",
        task_sampling: str = "proportional",
        temperature: float | None = None,
        seed: int = 42,
        shuffle: bool = True,
        micro_batch_size: int = 1,
        gradient_accumulation_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.task_ids = np.asarray(task_ids, dtype=np.int64)
        self.num_tasks = int(num_tasks)
        self.seq_len = int(seq_len)
        self.packing = packing
        self.task_sampling = task_sampling
        self.temperature = temperature
        self.seed = int(seed)
        self.shuffle = shuffle
        self.micro_batch_size = int(micro_batch_size)
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._cache: tuple[int, list[np.ndarray], np.ndarray] | None = None
        # The first epoch's plan now: its steps check the options and the layout (task sampling, packing and the
        # samples' lengths, micro-batch layout) before any model is built, not on the first batch.
        self._plan(0)

    def layout(self) -> dict[str, int]:
        """The ranks x micro-batches split, stored in the sampler state to check a resume."""
        return {
            "micro_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "world_size": self.world_size,
        }

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None  # workers rebuild what they need
        return state

    def rows(self, epoch: int) -> list[np.ndarray]:
        """All rows of ``epoch`` (every rank's), each an array of sample indices in row order."""
        return self._plan(epoch)[0]

    def _plan(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        epoch = 0 if not self.shuffle else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        if self.shuffle:
            order = epoch_order(
                self.task_ids, self.num_tasks, task_sampling=self.task_sampling, temperature=self.temperature,
                seed=self.seed, epoch=epoch,
            )
        else:
            order = np.arange(len(self.lengths), dtype=np.int64)
        packed = pack_lengths(self.lengths[order], self.seq_len, self.packing)
        if self.shuffle and self.packing == "pack":
            packed = [packed[i] for i in _rng(self.seed, epoch, 1).permutation(len(packed))]
        rows = [order[np.asarray(r, dtype=np.int64)] for r in packed]
        layout = micro_batch_rows(
            len(rows), micro_batch_size=self.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, rank=self.rank, world_size=self.world_size,
        )
        self._cache = (epoch, rows, layout)
        return rows, layout

    def num_micro_batches(self, epoch: int) -> int:
        """Micro-batches this rank runs in ``epoch`` (the same on every rank; a multiple of gas)."""
        return len(self._plan(epoch)[1])

    def steps_per_epoch(self, epoch: int) -> int:
        """Optimizer steps in ``epoch`` (varies between epochs only for uniform / temperature sampling)."""
        return self.num_micro_batches(epoch) // self.gradient_accumulation_steps

    def micro_batch(self, epoch: int, index: int) -> list[np.ndarray | None]:
        """The rows of this rank's micro-batch ``index`` of ``epoch``; ``None`` for an all-padding row."""
        rows, layout = self._plan(epoch)
        return [rows[i] if i >= 0 else None for i in layout[index].tolist()]


class MicroBatchSampler(Sampler):
    """Yields this rank's ``(epoch, micro_batch_index)`` keys; stateful for ``StatefulDataLoader``.

    Args:
        plan: the ``RowPlan`` (shared with the dataset in the main process).

    State: ``{"epoch", "yielded", "micro_batch_size", "gradient_accumulation_steps", "world_size"}``.
    """

    def __init__(self, plan: RowPlan) -> None:
        self.plan = plan
        self.epoch = 0
        self._epoch_set = False  # True once the recipe called set_epoch: its choice beats a loaded state's
        self._resume_at: int | None = None
        self._pass_epoch = 0
        self.yielded = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (a pending mid-epoch resume of the same epoch is kept)."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self._resume_at = None
        self.epoch = epoch
        self._epoch_set = True

    def __len__(self) -> int:
        return self.plan.num_micro_batches(self.epoch)

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Optimizer steps in ``epoch`` (default: the current one); for the LR schedule's total."""
        return self.plan.steps_per_epoch(self.epoch if epoch is None else epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # Not a generator function: the position must be set when torchdata calls iter(), because it may ask for
        # state_dict() before the first next().
        start, self._resume_at = self._resume_at or 0, None
        self._pass_epoch, self.yielded = self.epoch, start
        return self._keys(self.epoch, start, self.plan.num_micro_batches(self.epoch))

    def _keys(self, epoch: int, start: int, stop: int) -> Iterator[tuple[int, int]]:
        for k in range(start, stop):
            self.yielded = k + 1
            yield epoch, k

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._pass_epoch, "yielded": self.yielded, **self.plan.layout()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume at ``state_dict``'s position (applied by torchdata when the next iterator is created).

        Raises:
            LoaderStateError: the state comes from a different global batch size, or from a different split and
                not at an optimizer-step boundary (raised when the next iterator is created).
        """
        epoch, yielded = int(state_dict["epoch"]), int(state_dict["yielded"])
        if self._epoch_set and epoch != self.epoch:
            # The recipe already chose another epoch (the saved one was over): start that epoch from its beginning.
            self._resume_at = None
            return
        yielded = self._convert_position(state_dict, yielded)
        self.epoch, self._pass_epoch, self.yielded, self._resume_at = epoch, epoch, yielded, yielded

    def _convert_position(self, state: dict[str, int], yielded: int) -> int:
        old = {k: int(state.get(k, v)) for k, v in self.plan.layout().items()}
        new = self.plan.layout()
        if old == new:
            return yielded
        g_old = old["world_size"] * old["gradient_accumulation_steps"] * old["micro_batch_size"]
        g_new = new["world_size"] * new["gradient_accumulation_steps"] * new["micro_batch_size"]
        if g_old != g_new or yielded % old["gradient_accumulation_steps"]:
            raise LoaderStateError(
                f"cannot resume the data loader: it was saved with {old} after {yielded} micro-batches; resuming "
                f"with {new} needs the same global batch (world_size * gradient_accumulation_steps * "
                "micro_batch_size) and a state saved at an optimizer-step boundary"
            )
        return yielded // old["gradient_accumulation_steps"] * new["gradient_accumulation_steps"]


class MicroBatchDataset(Dataset):
    """Map-style dataset: key ``(epoch, micro_batch_index)`` -> the collated batch dict of that micro-batch.

    Args:
        samples: all samples (``dataset.Sample``).
        plan: the ``RowPlan`` over ``samples``.
        pad_id: token id written on padding.
    """

    def __init__(self, samples: Sequence[Sample], plan: RowPlan, pad_id: int = 0, collate_fn=collate) -> None:
        self.samples = samples
        self.plan = plan
        self.pad_id = int(pad_id)
        self.collate_fn = collate_fn
        # Packed rows use a fixed length: one shape for torch.compile, and the peak memory is reached at step 1
        # (an OOM shows at once, not hours in); rows are >= 95% full, so little is wasted. Padding mode pads to
        # the longest row of the micro-batch (rounded up to 8), since its rows vary widely in length.
        self.pad_to = plan.seq_len if plan.packing == "pack" else None

    def __len__(self) -> int:
        return self.plan.num_micro_batches(0)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        rows = self.plan.micro_batch(epoch, index)
        return self.collate_fn(
            [None if r is None else [self.samples[i] for i in r.tolist()] for r in rows],
            pad_to=self.pad_to, pad_id=self.pad_id,
        )


def _collate_fn(data: MFTData, split: str):
    """``packing.collate``, or the data's own for its samples (``preference.PreferenceData``: rows of pairs)."""
    collate_for = getattr(data, "collate_for", None)
    return collate if collate_for is None else collate_for(split)


def _loader(samples, plan: RowPlan, pad_id: int, num_workers: int, pin_memory: bool,
            collate_fn=collate) -> StatefulDataLoader:
    # batch_size=None: the dataset returns whole micro-batches; the sampler's keys go to it one by one.
    return StatefulDataLoader(
        MicroBatchDataset(samples, plan, pad_id, collate_fn),
        batch_size=None,
        sampler=MicroBatchSampler(plan),
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def build_train_loader(
    data: MFTData,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int = 1,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """The training loader of one rank over ``data.train_samples`` (module docstring: order, pack, steps, ranks),
    with the data's ``seq_len``, ``packing``, ``task_sampling``, ``temperature``, ``seed`` and ``pad_id``.

    Args:
        data: the dataset (``build.build_mft_data``).
        micro_batch_size: rows per micro-batch.
        gradient_accumulation_steps: micro-batches per rank per optimizer step.
        rank: this rank.
        world_size: number of ranks.
        num_workers: DataLoader worker processes (0: build batches in the main process; collation is cheap).
        pin_memory: pin batches for faster host-to-GPU copies.

    Returns:
        StatefulDataLoader: yields batch dicts; ``loader.sampler`` is the ``MicroBatchSampler``
        (``set_epoch``, ``len`` = micro-batches per epoch, ``steps_per_epoch(epoch)``).

    Raises:
        ValueError: invalid mode, temperature, layout, or a sample longer than ``seq_len``.
    """
    samples = data.train_samples
    plan = RowPlan(
        _lengths(samples), _task_ids(samples), len(data.task_names), seq_len=data.seq_len, packing=data.packing,
        task_sampling=data.task_sampling, temperature=data.temperature, seed=data.seed, shuffle=True,
        micro_batch_size=micro_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
        rank=rank, world_size=world_size,
    )
    return _loader(samples, plan, data.pad_id, num_workers, pin_memory, _collate_fn(data, "train"))


def build_valid_loader(
    data: MFTData,
    *,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> StatefulDataLoader:
    """The validation loader of one rank over ``data.valid_samples``: every valid row on exactly one rank, the
    same every epoch.

    Samples are packed in their given order (no shuffle); every rank runs the same number of micro-batches
    (all-padding rows at the end), because a sharded model's forward is a collective.

    Args:
        data: the dataset (its ``seq_len``, ``packing`` and ``pad_id`` are used).
        micro_batch_size: rows per micro-batch.
        rank: this rank.
        world_size: number of ranks.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches.

    Returns:
        StatefulDataLoader: yields batch dicts.

    Raises:
        ValueError: invalid packing or layout, or a sample longer than ``seq_len``.
    """
    samples = data.valid_samples
    plan = RowPlan(
        _lengths(samples), _task_ids(samples), len(data.task_names), seq_len=data.seq_len, packing=data.packing,
        shuffle=False, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
    )
    return _loader(samples, plan, data.pad_id, num_workers, pin_memory, _collate_fn(data, "valid"))


def _lengths(samples: Sequence[Sample]) -> np.ndarray:
    return np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))


def _task_ids(samples: Sequence[Sample]) -> np.ndarray:
    return np.fromiter((int(s.task_id) for s in samples), dtype=np.int64, count=len(samples))
