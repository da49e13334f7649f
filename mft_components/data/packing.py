"""Pack or pad tokenised samples into rows, and collate rows into the batch dict every recipe consumes.

Two layouts, chosen by the config key ``data.packing``:

* ``pack``: several samples share a row of at most ``seq_len`` tokens. Rows are filled by best-fit decreasing
  (longest sample first, each into the fullest row that still has room), which leaves a few percent of padding
  on chat data. No sample is ever split or lost: the last, partial rows are kept.
* ``padding``: one sample per row; a micro-batch is padded to its longest row rounded up to a multiple of 8.

A packed row of ``seq_len = 12`` holding sample A (4 tokens, loss on its last 2) and sample B (5 tokens, loss
on its last 3), then 3 padding tokens::

    token        a0   a1   a2   a3   b0   b1   b2   b3   b4   p    p    p
    loss_mask    .    .    x    x    .    .    x    x    x    .    .    .
    labels       -100 -100 a2   a3   -100 b2   b3   b4   -100 -100 -100 -100
    labels       (already shifted: labels[t] is the target of the prediction at t, i.e. token t+1 of the
                 same sample when that token carries loss; never the first token of the next sample)
    position_ids 0    1    2    3    0    1    2    3    4    0    0    0
    sample_ids   0    0    0    0    1    1    1    1    1    -1   -1   -1
    task_ids     tA   tA   tA   tA   tB   tB   tB   tB   tB   -1   -1   -1

and the attention it must get (row = query, column = key; 1 = may attend)::

           a0 a1 a2 a3 b0 b1 b2 b3 b4 p  p  p
        a0  1  0  0  0  0  0  0  0  0  0  0  0
        a1  1  1  0  0  0  0  0  0  0  0  0  0
        a2  1  1  1  0  0  0  0  0  0  0  0  0
        a3  1  1  1  1  0  0  0  0  0  0  0  0
        b0  0  0  0  0  1  0  0  0  0  0  0  0
        b1  0  0  0  0  1  1  0  0  0  0  0  0
        b2  0  0  0  0  1  1  1  0  0  0  0  0
        b3  0  0  0  0  1  1  1  1  0  0  0  0
        b4  0  0  0  0  1  1  1  1  1  0  0  0
        p   0  0  0  0  0  0  0  0  0  1  0  0
        p   0  0  0  0  0  0  0  0  0  0  1  0
        p   0  0  0  0  0  0  0  0  0  0  0  1

How that mask reaches the attention (transformers 5.x, checked in ``masking_utils.py`` and by
``tests/test_packing.py``): the collator emits NO ``attention_mask``, only ``position_ids`` that restart at 0
for every sample (and are 0 on every padding token). With ``attention_mask=None`` and no KV cache,
``transformers.masking_utils.find_packed_sequence_indices`` starts a new sequence wherever a position id does not
follow its left neighbour by exactly 1, and builds exactly the block-diagonal causal mask above, in the dtype
and layout each implementation wants: a boolean mask for ``sdpa`` and an additive float mask in the model's dtype
for ``eager``. Each padding token becomes a sequence of its own, so no softmax row is empty. ``flash_attention_2``
is the exception: transformers infers varlen boundaries from ``position_ids`` only for ONE row
(``_is_packed_sequence`` requires batch size 1) and otherwise runs plain causal flash attention across samples,
so for it mft passes the varlen boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``) from ``sample_ids`` as keyword
arguments to the model (``models/attention.py``). Why not a ready-made 4D mask from the collator:

* a boolean ``[B, 1, T, T]`` mask is correct for ``sdpa`` but SILENTLY WRONG for ``eager``, which adds the mask
  to the scores (True -> +1, False -> +0: no masking at all);
* an additive float mask is correct for both but must match the model's dtype (bf16 / fp32), which the data
  pipeline does not know, and ``B*T*T`` floats per micro-batch would be copied through the loader and to the
  device for nothing, as transformers builds the same mask on the device from ``position_ids``.

The one condition: the model must be called with ``use_cache=False`` (and no 2D ``attention_mask``). With the
default ``use_cache=True`` of most configs, transformers creates a ``DynamicCache`` even in training and then
skips the packed-sequence detection: attention would cross samples. (``tests/reference_masks.py`` builds the
explicit mask of the picture, the reference the tests compare every attention with.)
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from mft_components.data.dataset import Sample
from mft_components.data.records import DataError

__all__ = ["PACKING_MODES", "PAD_MULTIPLE", "check_packing", "pack_samples", "pack_lengths", "packing_efficiency",
           "collate", "collate_sequences"]

PACKING_MODES = ("pack", "padding")
# Padded lengths are rounded up to a multiple of 8: tensor-core friendly and fewer distinct shapes.
PAD_MULTIPLE = 8
IGNORE_INDEX = -100


def check_packing(packing: str) -> None:
    """Raise DataError unless ``packing`` is one of ``PACKING_MODES`` (config key ``data.packing``)."""
    if packing not in PACKING_MODES:
        raise DataError(f"data.packing: expected one of {PACKING_MODES}, got {packing!r}")


def pack_samples(samples: Sequence[Sample], seq_len: int, packing: str = "pack") -> list[list[int]]:
    """Group samples into rows of at most ``seq_len`` tokens.

    ``pack`` uses best-fit decreasing: samples are taken longest first (ties in their given order) and each goes
    into the open row with the least room left that still fits it, or opens a new row. The result depends only
    on the lengths and their order, so it is deterministic. ``padding`` gives one row per sample, in order.

    Args:
        samples: objects with ``input_ids`` (1-D array); usually ``dataset.Sample``.
        seq_len: the row capacity in tokens (config key ``data.seq_len``).
        packing: ``"pack"`` or ``"padding"`` (config key ``data.packing``).

    Returns:
        list[list[int]]: rows, each a list of indices into ``samples``. Every index appears exactly once.

    Raises:
        ValueError: unknown ``packing`` (a ``DataError``), or a sample longer than ``seq_len`` or empty
            (``data.truncation`` drops or truncates those before packing).
    """
    lengths = np.fromiter((len(s.input_ids) for s in samples), dtype=np.int64, count=len(samples))
    return pack_lengths(lengths, seq_len, packing)


def pack_lengths(lengths: np.ndarray | Sequence[int], seq_len: int, packing: str = "pack") -> list[list[int]]:
    """``pack_samples`` on bare lengths (what the sampler uses: it packs every epoch without copying samples).

    Args:
        lengths: token count of each sample.
        seq_len: the row capacity in tokens.
        packing: ``"pack"`` or ``"padding"``.

    Returns:
        list[list[int]]: rows of indices into ``lengths``.

    Raises:
        ValueError: as ``pack_samples``.
    """
    check_packing(packing)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > seq_len or lengths.min() < 1):
        bad = int(np.flatnonzero((lengths > seq_len) | (lengths < 1))[0])
        raise ValueError(
            f"sample {bad} has {int(lengths[bad])} tokens; packing needs 1..data.seq_len={seq_len} "
            "(data.truncation should have dropped or truncated it)"
        )
    if packing == "padding":
        return [[i] for i in range(len(lengths))]
    return _best_fit_decreasing(lengths, seq_len)


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    # Open rows are bucketed by remaining room; `rooms` is the sorted list of non-empty buckets, so the best fit
    # for a sample of n tokens is the first room >= n (a bisect), O(log rows) per sample instead of a scan.
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    rooms: list[int] = []
    buckets: dict[int, list[int]] = {}
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect_left(rooms, n)
        if k == len(rooms):
            row = len(rows)
            rows.append([i])
            left = capacity - n
        else:
            room = rooms[k]
            bucket = buckets[room]
            row = bucket.pop()  # LIFO inside a bucket: any fixed rule keeps the packing deterministic
            if not bucket:
                del buckets[room]
                del rooms[k]
            rows[row].append(i)
            left = room - n
        if left > 0:
            if left not in buckets:
                buckets[left] = []
                insort(rooms, left)
            buckets[left].append(row)
    return rows


def packing_efficiency(rows: Sequence[Sequence[int]], lengths: np.ndarray | Sequence[int], seq_len: int) -> float:
    """Real tokens / row tokens (``len(rows) * seq_len``) of a packing; 1.0 when there are no rows.

    Args:
        rows: as returned by ``pack_samples``.
        lengths: token count of each sample the rows index.
        seq_len: the row capacity in tokens.

    Returns:
        float: in (0, 1].
    """
    if not rows:
        return 1.0
    lengths = np.asarray(lengths, dtype=np.int64)
    real = sum(int(lengths[list(r)].sum()) for r in rows)
    return real / (len(rows) * seq_len)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(
    rows: Sequence[Sequence[Sample] | None],
    *,
    pad_to: int | None = None,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Build the batch dict of one micro-batch (the format is fixed in CONTRACT.md, "Batch format").

    Args:
        rows: one entry per row: the samples packed into it, in order; ``None`` or ``[]`` is an all-padding row
            (used to give every rank the same number of micro-batches at the end of an epoch).
        pad_to: the row length T. ``None`` pads to the longest row rounded up to a multiple of 8 (at least 8):
            what ``padding`` mode uses. Packed micro-batches use ``pad_to=seq_len`` (see ``sampling.py``).
        pad_id: the token id written on padding (never attended to by real tokens, never a label).

    Returns:
        dict[str, torch.Tensor]: ``input_ids``, ``labels`` (already shifted; -100 where no loss),
        ``position_ids`` (restart at 0 per sample; 0 on padding), ``sample_ids`` (0..n-1 over the micro-batch;
        -1 on padding), ``task_ids`` (-1 on padding); all int64 ``[B, T]``. No ``attention_mask``: the packed
        ``position_ids`` make transformers build the block-diagonal causal mask (module docstring).

    Raises:
        ValueError: a row is longer than ``pad_to``.
    """
    return collate_sequences(rows, lambda s: ((s.input_ids, s.loss_mask, s.task_id),), pad_to=pad_to, pad_id=pad_id)


def collate_sequences(rows: Sequence[Sequence[Any] | None], sequences: Callable[[Any], Iterable[tuple]], *,
                      pad_to: int | None = None, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``collate`` for rows of items that each hold one or more sequences back to back: ``sequences(item)`` gives
    ``(ids, loss_mask, task_id)`` per sequence (a preference pair: chosen, then rejected), each its own sample;
    ``item.input_ids`` is all of them (the row's length)."""
    lengths = [sum(len(s.input_ids) for s in row) if row else 0 for row in rows]
    longest = max(lengths, default=0)
    if pad_to is None:
        pad_to = max(_round_up(longest, PAD_MULTIPLE), PAD_MULTIPLE)
    elif longest > pad_to:
        raise ValueError(f"a row has {longest} tokens but the micro-batch is padded to {pad_to} (data.seq_len)")
    shape = (len(rows), pad_to)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    sample_ids = np.full(shape, -1, dtype=np.int64)
    task_ids = np.full(shape, -1, dtype=np.int64)
    next_sample = 0
    for b, row in enumerate(rows):
        start = 0
        for item in row or ():
            for ids, mask, task_id in sequences(item):
                ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
                n, end = len(ids), start + len(ids)
                input_ids[b, start:end] = ids
                # Shift inside the sample: the prediction at t targets token t+1 if that token carries loss. The
                # last token of a sample predicts nothing (its label stays -100), so no label crosses samples.
                labels[b, start : end - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
                position_ids[b, start:end] = np.arange(n)
                sample_ids[b, start:end] = next_sample
                task_ids[b, start:end] = int(task_id)
                next_sample += 1
                start = end
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "sample_ids": torch.from_numpy(sample_ids),
        "task_ids": torch.from_numpy(task_ids),
    }
