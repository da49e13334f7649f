"""mft's own packed-sequence attention functions, and the per-micro-batch boundaries every backend takes.

A packed row holds several samples that must never attend to each other. The boundaries come from the
``sample_ids`` of the micro-batch (computed once per micro-batch, never per layer)::

    row:          [ a0 a1 a2 a3 | b0 b1 b2 b3 b4 | p  p  p ]      (p = padding, sample_ids -1)
    sdpa_varlen:  causal SDPA on [a0..a3] and on [b0..b4]; zeros on padding     segment_lengths ((4, 5),)
    flex_attention: one call per micro-batch, BlockMask "same sample id and q >= kv" (padding attends to
                  padding only)                                                 block_causal_block_mask
    varlen_attn / flash_attention_2: the batch flattened to B*T tokens, cu_seqlens [0, 4, 9, 12] (the padding is a
                  sequence of its own), max length T                            cu_seqlens

``sdpa_varlen`` (CPU): the masked ``sdpa`` path makes PyTorch's CPU flash kernel score every query against every
key of the row, and its backward is the slowest op of a CPU step (bench/RESULTS.md); causal SDPA per sample skips
the upper triangle and all cross-sample blocks. Padding (always at the end of a row) gets a zero output, tied to
its q, k and v (times 0), so that a micro-batch of padding only still gives the q/k/v projections a (zero)
gradient, as every other rank's micro-batch does (FSDP2 needs the same set of gradients on every rank). When
every row holds one sample (``packing: padding``) the micro-batch takes one batched ``is_causal=True`` call.
``varlen_attn`` is torch's FlashAttention varlen kernel on the flattened micro-batch.

Which backend a run uses, and how these boundaries reach it, is ``attention.py`` (``BACKENDS``); it registers
the two functions here with transformers' ``AttentionInterface``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SDPA_VARLEN", "VARLEN_ATTN", "segment_lengths", "segments_from_position_ids", "cu_seqlens",
           "block_causal_block_mask", "flex_attention_forward", "sdpa_varlen_attention_forward",
           "varlen_attention_forward", "varlen_options"]

SDPA_VARLEN = "sdpa_varlen"
VARLEN_ATTN = "varlen_attn"


# ----------------------------------------------------------------------------------------------- boundaries


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


def _check_packed_call(implementation: str, module, query, key, attention_mask, kwargs: dict) -> str:
    """What mft's packed attentions do not do, as errors naming the module; returns its name."""
    name = type(module).__name__
    if attention_mask is not None:
        raise ValueError(f"{name}: {implementation} got an attention mask; it takes sample boundaries only")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{name}: {implementation} does not support attention logit softcapping; use eager")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"{name}: {implementation} is for training forwards without a KV cache (q {query.shape[2]}, "
                         f"kv {key.shape[2]}); generate with attn_implementation: sdpa")
    return name


def _direct_call_segments(query, position_ids) -> tuple[tuple[int, ...], ...]:
    """Segments for a call without mft's prepared boundaries (the transformers model called directly, as for
    sdpa): from ``position_ids`` (per layer, so slower), or one causal segment per row when there are none."""
    if position_ids is None:
        return tuple((query.shape[2],) for _ in range(query.shape[0]))
    return segments_from_position_ids(position_ids.expand(query.shape[0], -1))


def segments_from_position_ids(position_ids: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """Fallback without sample_ids: a sample starts wherever the position does not follow its left neighbour
    (each padding token, position 0, then counts as a 1-token sample, as in transformers' packed detection)."""
    pos = position_ids.detach().cpu().numpy()
    out = []
    for row in pos:
        starts = np.flatnonzero(row[1:] != row[:-1] + 1) + 1
        bounds = np.concatenate(([0], starts, [len(row)]))
        out.append(tuple(int(n) for n in np.diff(bounds)))
    return tuple(out)


def cu_seqlens(sample_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence starts of a micro-batch flattened to ``B*T`` tokens (FlashAttention's varlen format).

    A sequence starts at every row start and wherever the sample id changes; a row's trailing padding is one
    sequence of its own (it attends causally to padding only: finite outputs that nothing reads).

    Args:
        sample_ids: int64 ``[B, T]`` on the host (the collator's; a device tensor is copied back, which waits
            for the device).

    Returns:
        int32 ``[N + 1]`` host tensor: ``[0, ..., B*T]``.
    """
    ids = sample_ids.detach().cpu().numpy()
    b, t = ids.shape
    change = np.ones((b, t), dtype=bool)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = np.flatnonzero(change.reshape(-1))
    return torch.from_numpy(np.append(starts, b * t).astype(np.int32))


def block_causal_block_mask(sample_ids: torch.Tensor):
    """flex_attention's ``BlockMask`` of a packed micro-batch: query q may see key kv of its row when both carry
    the same sample id and kv <= q (padding, id -1, sees earlier padding only). Built on ``sample_ids``' device,
    without reading anything back to the host; blocks that cross samples are skipped by the kernel."""
    ids = sample_ids
    batch, length = ids.shape

    def same_sample_causal(b, h, q, kv):
        return (q >= kv) & (ids[b, q] == ids[b, kv])

    return _create_block_mask(ids.device.type)(same_sample_causal, batch, None, length, length, device=ids.device)


_COMPILED_CREATE_BLOCK_MASK = None


def _create_block_mask(device_type: str) -> Callable:
    """``create_block_mask``, compiled on GPUs (one pass over the blocks instead of a dense [B, T, T] mask), eager
    on the CPU (tests: tiny rows). One compiled function for the process: one graph serves every micro-batch of
    a shape (the mask function is a new closure each time; dynamo guards its code, not its identity). torch's own
    ``_compile=True`` flag does the same per call and is deprecated (torch 2.11 warns)."""
    from torch.nn.attention.flex_attention import create_block_mask

    global _COMPILED_CREATE_BLOCK_MASK
    if device_type != "cuda":
        return create_block_mask
    if _COMPILED_CREATE_BLOCK_MASK is None:
        _COMPILED_CREATE_BLOCK_MASK = torch.compile(create_block_mask)
    return _COMPILED_CREATE_BLOCK_MASK


# --------------------------------------------------------------------------------------- attention functions


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
        attention_mask: must be None (transformers builds no mask for an attention without a mask function).
        dropout: attention dropout probability (0 in eval).
        scaling: softmax scale (None: 1/sqrt(D)).
        segment_lengths: per row, the lengths of its causal segments (``attention_kwargs``).

    Returns:
        (attention output ``[B, T, H, D]``, None).

    Raises:
        ValueError: no segments given, segments that do not cover the rows, a mask, softcapping, a KV cache
            (query and key lengths differ) or a sliding window shorter than a segment.
    """
    name = _check_packed_call(SDPA_VARLEN, module, query, key, attention_mask, kwargs)
    if segment_lengths is None:  # called on the transformers model directly: boundaries from the positions
        segment_lengths = _direct_call_segments(query, kwargs.get("position_ids"))
    q_len = query.shape[2]
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


def varlen_options(params: frozenset[str], heads: int, kv_heads: int, dim: int, scaling: float | None,
                   window: int | None) -> tuple[dict[str, Any], int]:
    """Keyword arguments of this torch's ``varlen_attn`` for causal attention, and how often to repeat key/value
    heads when it cannot do grouped-query attention itself.

    Args:
        params: its parameter names (``_VARLEN_PARAMETERS``).
        heads, kv_heads, dim: query heads, key/value heads, head size.
        scaling: the model's softmax scale (None: 1/sqrt(dim)).
        window: a sliding window in tokens, or None.

    Raises:
        ValueError: a window or a non-default scale this torch's varlen_attn cannot express.
    """
    options: dict[str, Any] = {}
    if "window_size" in params:
        # (left, right): (-1, 0) is causal; a sliding window of w tokens sees w - 1 earlier ones
        options["window_size"] = (int(window) - 1 if window else -1, 0)
    else:
        if window:
            raise ValueError("this torch's varlen_attn has no sliding window; use sdpa or flash_attention_2")
        options["is_causal"] = True
    if "scale" in params:
        options["scale"] = scaling
    elif scaling is not None and abs(scaling - dim**-0.5) > 1e-9 * abs(scaling):
        raise ValueError(f"this torch's varlen_attn takes no softmax scale (the model uses {scaling}); use sdpa")
    repeat = 1
    if kv_heads != heads:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            repeat = heads // kv_heads
    return options, repeat


try:  # torch >= 2.9; its signature changed between releases (2.9: is_causal; later: window_size, scale;
    # 2.12: enable_gqa), read once here so that compiled layers see constants
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn

    _VARLEN_PARAMETERS = frozenset(inspect.signature(_torch_varlen_attn).parameters)
except ImportError:
    _torch_varlen_attn, _VARLEN_PARAMETERS = None, frozenset()


def _varlen_kernel(q, k, v, cu: torch.Tensor, max_len: int, options: dict[str, Any]) -> torch.Tensor:
    return _torch_varlen_attn(q, k, v, cu, cu, max_len, max_len, **options)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: torch's ``varlen_attn`` (FlashAttention varlen kernels) on the micro-batch
    flattened to ``B*T`` tokens, one causal sequence per sample (``cu_seqlens``).

    Args:
        query, key, value: ``[B, H, T, D]`` / ``[B, H_kv, T, D]``.
        attention_mask: must be None (transformers builds no mask for an attention without a mask function).
        dropout: must be 0 (the kernel has no attention dropout).
        scaling: softmax scale (None: 1/sqrt(D)).
        cu_seq_lens_q: int32 ``[N + 1]`` sequence starts on the device (``attention_kwargs``).
        max_length_q: an upper bound on a sequence's length (the row length T: a constant, so compiled layers
            do not specialise on each micro-batch's longest sample).

    Returns:
        (attention output ``[B, T, H, D]``, None).

    Raises:
        ValueError: no boundaries, a mask, dropout, softcapping, a KV cache, or what this torch's varlen_attn
            cannot express (a sliding window on torch 2.9).
    """
    name = _check_packed_call(VARLEN_ATTN, module, query, key, attention_mask, kwargs)
    if dropout:
        raise ValueError(f"{name}: varlen_attn has no attention dropout (got {dropout}); use flex_attention or sdpa")
    if cu_seq_lens_q is None:  # called on the transformers model directly: boundaries from the positions
        lengths = [n for row in _direct_call_segments(query, kwargs.get("position_ids")) for n in row]
        cu_seq_lens_q = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32, device=query.device)
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    options, repeat = varlen_options(_VARLEN_PARAMETERS, heads, kv_heads, dim, scaling, kwargs.get("sliding_window"))
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, value.shape[-1])
    if repeat > 1:  # a torch without enable_gqa: one key/value head per query head
        k, v = (t.repeat_interleave(repeat, dim=1) for t in (k, v))
    max_len = int(max_length_q or length)
    out = _varlen_kernel(q, k, v, cu_seq_lens_q, max_len, options)
    return out.reshape(batch, length, heads, -1), None


def flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function registered as ``flex_attention``: mft's packed rows (a ``BlockMask``, no
    logit softcapping, attention sinks, position bias or dropout, no KV cache) call ``flex_attention`` with
    ``enable_gqa``, so each group of query heads reads its key/value head inside the kernel. transformers' own
    function copies the key/value heads out to one per query head (``repeat_kv``) whenever the query head count
    is not a power of two (Llama-3.2-3B: 24 query heads, 8 key/value heads): three times the key/value memory
    and traffic, forward and backward. Every other call goes to transformers' function unchanged.

    ``kernel_options`` (from ``attention_kwargs``: flex's FlashAttention backend where ``auto`` chose it) pass
    through. Outside a compiled layer flex_attention runs compiled (transformers' ``compile_friendly_flex_attention``).

    Returns:
        (attention output ``[B, T, H, D]``, None).
    """
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations import flex_attention as hf_flex

    packed = (isinstance(attention_mask, BlockMask) and not dropout and key.shape[2] == query.shape[2]
              and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "position_bias")))
    if not packed:
        return hf_flex.flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                              dropout=dropout, **kwargs)
    out = hf_flex.compile_friendly_flex_attention(
        query, key, value, block_mask=attention_mask, enable_gqa=key.shape[1] != query.shape[1], scale=scaling,
        kernel_options=kwargs.get("kernel_options"), training=module.training,
    )
    return out.transpose(1, 2).contiguous(), None
