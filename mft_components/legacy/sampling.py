"""Deprecated name of ``mft_components.data.sampling`` (task-balanced, distributed, resumable loaders), kept for
old recipes.

The loaders now take the dataset: ``build_train_loader(data, micro_batch_size=..., ...)``. The old functions of
samples and options are here under their old names, and every recipe copied before the change imports this
module, so ``MFTData.train_loader`` / ``valid_loader`` (its old calls) come back with it (``moved_names``).
"""

import warnings
from typing import Sequence

import mft_components.moved_names  # noqa: F401  (puts back MFTData.train_loader, valid_loader, stats, ...)
from mft_components.data import sampling as _sampling
from mft_components.data.dataset import MFTData
from mft_components.data.sampling import (
    TASK_SAMPLING_MODES,
    LoaderStateError,
    MicroBatchDataset,
    MicroBatchSampler,
    RowPlan,
    epoch_order,
    micro_batch_rows,
    task_probabilities,
)
from mft_components.data.templates import ChatFormat

__all__ = ["TASK_SAMPLING_MODES", "LoaderStateError", "MicroBatchDataset", "MicroBatchSampler", "RowPlan",
           "build_train_loader", "build_valid_loader", "epoch_order", "micro_batch_rows", "task_probabilities"]


def _dataset(samples, task_names, **options) -> MFTData:
    return MFTData(task_names=list(task_names), chat_format=ChatFormat(), train_samples=list(samples),
                   valid_samples=list(samples), **options)


def build_train_loader(samples: Sequence, task_names: Sequence[str], *, seq_len: int, packing: str = "pack",
                       task_sampling: str = "proportional", temperature: float | None = None, micro_batch_size: int,
                       gradient_accumulation_steps: int = 1, rank: int = 0, world_size: int = 1, seed: int = 42,
                       pad_id: int = 0, num_workers: int = 0, pin_memory: bool = False):
    """The old signature of ``mft_components.data.sampling.build_train_loader`` (samples and options)."""
    warnings.warn("mft_components.sampling.build_train_loader(samples, task_names, ...) is deprecated: use "
                  "mft_components.data.sampling.build_train_loader(data, ...)", DeprecationWarning, stacklevel=2)
    data = _dataset(samples, task_names, seq_len=seq_len, packing=packing, task_sampling=task_sampling,
                    temperature=temperature, seed=seed, pad_id=pad_id)
    return _sampling.build_train_loader(data, micro_batch_size=micro_batch_size,
                                        gradient_accumulation_steps=gradient_accumulation_steps, rank=rank,
                                        world_size=world_size, num_workers=num_workers, pin_memory=pin_memory)


def build_valid_loader(samples: Sequence, *, seq_len: int, packing: str = "pack", micro_batch_size: int,
                       rank: int = 0, world_size: int = 1, pad_id: int = 0, num_workers: int = 0,
                       pin_memory: bool = False):
    """The old signature of ``mft_components.data.sampling.build_valid_loader`` (samples and options)."""
    warnings.warn("mft_components.sampling.build_valid_loader(samples, ...) is deprecated: use "
                  "mft_components.data.sampling.build_valid_loader(data, ...)", DeprecationWarning, stacklevel=2)
    task_names = [str(t) for t in range(max((int(s.task_id) for s in samples), default=0) + 1)]
    data = _dataset(samples, task_names, seq_len=seq_len, packing=packing, pad_id=pad_id)
    return _sampling.build_valid_loader(data, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                                        num_workers=num_workers, pin_memory=pin_memory)


warnings.warn("mft_components.sampling moved to mft_components.data.sampling; import from there",
              DeprecationWarning, stacklevel=2)
