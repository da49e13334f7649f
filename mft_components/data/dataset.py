"""The tokenised multi-task dataset: ``Sample`` (one conversation's ids and loss mask) and ``MFTData`` (the
samples of every task, split into train and validation, with the options the loaders need).

``build.py`` makes it; ``packing.py`` packs its samples into rows, ``sampling.py`` builds the loaders over it,
``stats.py`` tells what it holds. The train / validation split is per task and depends only on the seed and the
task's name, never on the number of ranks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from mft_components.data.templates import ChatFormat

__all__ = ["Sample", "MFTData", "split_task"]


@dataclass
class Sample:
    """One tokenised conversation.

    Args:
        input_ids: int32 token ids (``len <= seq_len``).
        loss_mask: bool, True where the token is a training target (assistant content and its EOS).
        task_id: index into ``MFTData.task_names``.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    task_id: int


@dataclass
class MFTData:
    """The tokenised multi-task dataset, split into train and validation samples.

    Attributes:
        task_names: task names; ``Sample.task_id`` indexes this list.
        chat_format: the ``ChatFormat`` the samples were rendered with (saved in checkpoints).
        train_samples, valid_samples: lists of ``Sample``.
        seq_len, packing, task_sampling, temperature, seed, pad_id: what the loaders need.
        eos_token: the tokenizer's EOS (saved in checkpoints).
        skipped: ``path:line: field: problem`` of the records skipped with ``on_bad_record: skip``.
        task_files: the files of each task.
        counts: per task, what the build read and kept (``stats.task_stats`` adds the packed rows).
        notes: what a user should read before training on it (files the task search skipped, samples dropped or
            truncated; lines starting with ``WARNING`` are above a threshold); printed by the run and by
            ``mft validate`` / ``mft data``.

    Its loaders are ``sampling.build_train_loader(data, ...)`` and ``sampling.build_valid_loader(data, ...)``.
    """

    task_names: list[str]
    chat_format: ChatFormat
    train_samples: list[Sample]
    valid_samples: list[Sample]
    seq_len: int
    packing: str = "pack"
    task_sampling: str = "proportional"
    temperature: float | None = None
    seed: int = 42
    pad_id: int = 0
    eos_token: str | None = None
    skipped: list[str] = field(default_factory=list)
    task_files: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def task_sample_counts(self) -> dict[str, int]:
        """Training samples per task."""
        counts = np.bincount([s.task_id for s in self.train_samples], minlength=len(self.task_names))
        return {t: int(c) for t, c in zip(self.task_names, counts)}


def split_task(n: int, name: str, seed: int, valid_ratio: float, valid_size: int | None) -> np.ndarray:
    """Indices (of a task's n samples) that go to validation: deterministic in (seed, task name), rank-free."""
    if valid_size is not None:
        k = int(valid_size)
    else:
        k = int(round(n * float(valid_ratio)))
        if valid_ratio > 0:
            k = max(k, 1)
    k = min(k, n - 1) if n >= 2 else 0  # keep at least one training sample
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    return np.sort(rng.permutation(n)[:k])
