"""``sdpa_varlen``: packed-sequence attention without a mask, one causal SDPA call per sample.

A packed row holds several samples that must never attend to each other. With ``attn_implementation="sdpa"``
transformers turns the packed ``position_ids`` into a block-diagonal ``[B, 1, T, T]`` mask; PyTorch's CPU flash
kernel accepts it but then computes every query against every key of the row, and its backward is the slowest
op of a training step (profile in bench/RESULTS.md). ``sdpa_varlen`` instead cuts each row into its samples and
calls ``F.scaled_dot_product_attention(..., is_causal=True)`` on each one: no mask is built, the kernel skips
the upper triangle, and cross-sample blocks are never computed::

    row:       [ a0 a1 a2 a3 | b0 b1 b2 b3 b4 | p  p  p ]      (p = padding, sample_ids -1)
    segments:  [ a0 .. a3 ]  [ b0 .. b4 ]  padding             segment_lengths = ((4, 5),), T = 12
    attention: causal SDPA on each sample; zeros on padding; concatenated back into the row

Padding (always at the end of a row) attends to nothing and gets a zero output: it carries no loss and no real
token attends to it. The zeros are tied to the padding's q, k and v (times 0), so a micro-batch of padding only
still gives the q/k/v projections a (zero) gradient, as every other rank's micro-batch does (FSDP2 needs the
same set of gradients on every rank). Real tokens get exactly the attention of a per-sample run (``tests/test_attention.py``).
When every row holds one sample (``packing: padding``) the micro-batch takes one batched ``is_causal=True``
call (trailing padding then attends causally to its own row, which nothing reads).

Use it through ``build_model(..., attn_implementation="sdpa_varlen")``; ``MFTModel.forward`` passes the
segments (``attention_kwargs(batch, config)``), computed once per micro-batch from ``sample_ids``. It is for
training and evaluation forwards on packed batches; generation with a KV cache uses ``sdpa``. On GPUs prefer
``flash_attention_2`` (varlen kernels with the same effect).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SDPA_VARLEN", "attention_kwargs", "known_attn_implementations", "kv_cache_attention", "segment_lengths",
    "sdpa_varlen_attention_forward",
]

SDPA_VARLEN = "sdpa_varlen"
# mft's own implementations, registered with transformers' AttentionInterface below.
MFT_IMPLEMENTATIONS = (SDPA_VARLEN,)
# Training attentions that cannot decode with a KV cache, and the one generation uses in their place.
NO_KV_CACHE = {SDPA_VARLEN}
KV_CACHE_ATTENTION = "sdpa"


def known_attn_implementations() -> list[str]:
    """Every value ``model.attn_implementation`` may take: transformers' ``eager``, the implementations
    registered with its ``AttentionInterface`` (sdpa, flash_attention_2, flex_attention, ...) and mft's own.
    ``mft validate`` checks a config against this list; whether a GPU kernel is installed is the run's business.
    """
    from transformers import AttentionInterface

    return ["eager", *dict.fromkeys([*AttentionInterface().valid_keys(), *MFT_IMPLEMENTATIONS])]


def segment_lengths(sample_ids: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Per row, the lengths of its samples in order; the row's trailing padding (-1) is what they leave of T.

    Args:
        sample_ids: int64 ``[B, T]`` from the collator (``-1`` on padding, which comes after a row's samples).

    Returns:
        tuple of B tuples of positive ints, each summing to at most T. An all-padding row gives ``()``.

    Raises:
        ValueError: padding before a sample in some row (the collator never emits that).
    """
    ids = sample_ids.detach().cpu().numpy()
    out = []
    for b, row in enumerate(ids):
        real = int((row >= 0).sum())
        if (row[:real] < 0).any():
            raise ValueError(f"sdpa_varlen: row {b} of sample_ids has padding before a sample; padding must come last")
        if real == 0:
            out.append(())
            continue
        # a sample starts at 0 and wherever the sample id changes inside the real part of the row
        starts = np.flatnonzero(row[1:real] != row[: real - 1]) + 1
        out.append(tuple(int(n) for n in np.diff(np.concatenate(([0], starts, [real])))))
    return tuple(out)


def _segments_from_position_ids(position_ids: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Fallback without sample_ids: a sample starts wherever the position does not follow its left neighbour
    (each padding token, position 0, then counts as a 1-token sample, as in transformers' packed detection)."""
    pos = position_ids.detach().cpu().numpy()
    out = []
    for row in pos:
        starts = np.flatnonzero(row[1:] != row[:-1] + 1) + 1
        bounds = np.concatenate(([0], starts, [len(row)]))
        out.append(tuple(int(n) for n in np.diff(bounds)))
    return tuple(out)


def attention_kwargs(batch: dict, config) -> dict:
    """Extra keyword arguments for the decoder's forward that the configured attention needs.

    Args:
        batch: collator output (``sample_ids`` preferred, else ``position_ids``).
        config: the transformers config (``_attn_implementation`` selects the attention).

    Returns:
        ``{"segment_lengths": ...}`` for ``sdpa_varlen``, else ``{}``.

    Raises:
        ValueError: ``sdpa_varlen`` with an explicit ``attention_mask`` in the batch, or no way to find the
            samples (neither ``sample_ids`` nor ``position_ids``).
    """
    if getattr(config, "_attn_implementation", None) != SDPA_VARLEN:
        return {}
    if batch.get("attention_mask") is not None:
        raise ValueError(
            "model.attn_implementation: sdpa_varlen takes sample boundaries from sample_ids and ignores an "
            "attention_mask; remove the mask from the batch or use attn_implementation: sdpa"
        )
    if batch.get("sample_ids") is not None:
        return {"segment_lengths": segment_lengths(batch["sample_ids"])}
    if batch.get("position_ids") is not None:
        return {"segment_lengths": _segments_from_position_ids(batch["position_ids"])}
    raise ValueError("model.attn_implementation: sdpa_varlen needs sample_ids or position_ids in the batch")


def sdpa_varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_lengths: tuple[tuple[int, ...], ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``): causal SDPA per sample segment.

    Args:
        module: the attention module (unused but for its name in errors).
        query, key, value: ``[B, H, T, D]`` / ``[B, H_kv, T, D]`` (grouped-query heads are handled by SDPA).
        attention_mask: must be None (the mask function registered for ``sdpa_varlen`` builds none).
        dropout: attention dropout probability (0 in eval).
        scaling: softmax scale (None: 1/sqrt(D)).
        segment_lengths: per row, the lengths of its causal segments (``attention_kwargs``).

    Returns:
        (attention output ``[B, T, H, D]``, None).

    Raises:
        ValueError: no segments given, segments that do not cover the rows, a mask, softcapping, a KV cache
            (query and key lengths differ) or a sliding window shorter than a segment.
    """
    name = type(module).__name__
    if segment_lengths is None:
        raise ValueError(
            f"{name}: attn_implementation sdpa_varlen needs segment_lengths (MFTModel.forward passes them); "
            "call the transformers model directly with attn_implementation: sdpa (e.g. for generation)"
        )
    if attention_mask is not None:
        raise ValueError(f"{name}: sdpa_varlen got an attention mask; it takes sample boundaries only")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{name}: sdpa_varlen does not support attention logit softcapping; use eager")
    q_len = query.shape[2]
    if key.shape[2] != q_len:
        raise ValueError(f"{name}: sdpa_varlen is for training forwards without a KV cache (q {q_len}, kv {key.shape[2]})")
    if len(segment_lengths) != query.shape[0] or any(sum(row) > q_len for row in segment_lengths):
        raise ValueError(f"{name}: segment_lengths {segment_lengths} do not fit {query.shape[0]} rows of {q_len}")
    window = kwargs.get("sliding_window")
    if window is not None and max((n for row in segment_lengths for n in row), default=0) > window:
        raise ValueError(f"{name}: sdpa_varlen does not implement sliding_window={window} (a sample is longer)")

    gqa = query.shape[1] != key.shape[1]

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)

    if all(len(row) == 1 for row in segment_lengths):
        # one sample per row (packing: padding): a single batched call. Trailing padding attends causally to its
        # row; no real token sees it and it carries no loss.
        out = causal(query, key, value)
    else:
        rows = []
        for b, lengths in enumerate(segment_lengths):
            pad = q_len - sum(lengths)
            # split (not slicing): backward concatenates the segment gradients in one copy
            qs, ks, vs = (t[b : b + 1].split(lengths + (pad,), dim=2) for t in (query, key, value))
            outs = [causal(qs[i], ks[i], vs[i]) for i in range(len(lengths))]
            if pad:  # padding attends to nothing: zeros, no kernel call
                outs.append(_padding_output(qs[-1], ks[-1], vs[-1]))
            rows.append(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
        out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _padding_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Zeros for padding queries ``[1, H, pad, Dv]``, computed as ``0 * (sum q + sum k + sum v)``.

    A constant would do for the values, but not for the gradients: in a micro-batch of padding only (the padding
    rows that fill up an epoch's last optimizer step) the q/k/v projections would then get no gradient at all
    (``None``, not zeros). FSDP2 reduce-scatters only the parameters that have a gradient, so that rank would
    send fewer bytes than the ranks with real tokens: gloo fails with "Received data size doesn't match expected
    size" in ``post_backward``, NCCL may hang. Tying the zeros to q, k and v gives every rank the same set of
    gradients (zero here) whatever its data.
    """
    tie = q.sum() + k.sum() + v.sum()
    return q.new_zeros(1, q.shape[1], q.shape[2], v.shape[-1]) + tie * 0


@contextlib.contextmanager
def kv_cache_attention(config):
    """Inside the block, a model trained with an attention in ``NO_KV_CACHE`` runs ``sdpa`` (same weights, same
    math on an unpacked batch) so that it can generate with a KV cache; others run as they are.

    Args:
        config: the transformers config (shared by the model's modules; its sub-configs follow it).
    """
    current = getattr(config, "_attn_implementation", None)
    if current not in NO_KV_CACHE:
        yield
        return
    config._attn_implementation = KV_CACHE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = current


def _no_mask(*args, **kwargs) -> None:
    """Mask function for ``sdpa_varlen``: boundaries travel as ``segment_lengths``, no mask is built."""
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention_forward)
    AttentionMaskInterface.register(SDPA_VARLEN, _no_mask)


_register()
