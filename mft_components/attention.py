"""Packed-sequence attention: every attention mft trains with, in one table, and the ``auto`` choice per device.

A packed row holds several samples that must never attend to each other. Each backend below keeps them apart in
its own way, from the ``sample_ids`` of the micro-batch (computed once per micro-batch, never per layer)::

    row:          [ a0 a1 a2 a3 | b0 b1 b2 b3 b4 | p  p  p ]      (p = padding, sample_ids -1)
    sdpa_varlen:  causal SDPA on [a0..a3] and on [b0..b4]; zeros on padding     segment_lengths ((4, 5),)
    flex_attention: one call per micro-batch, BlockMask "same sample id and q >= kv" (padding attends to
                  padding only)
    varlen_attn / flash_attention_2: the batch flattened to B*T tokens, cu_seqlens [0, 4, 9, 12] (the padding is a
                  sequence of its own), max length T
    sdpa / eager: transformers builds the block-diagonal [B, 1, T, T] mask from the restarting position_ids

``BACKENDS`` is the table (devices, whether whole decoder layers compile with static shapes, how a micro-batch's
boundaries reach the attention); ``AUTO_ORDER`` is what ``attn_implementation: auto`` tries, per device type,
first available wins; ``resolve_attn_implementation`` is the only place that decides. Nothing else in mft
chooses an attention. The CUDA order is flex_attention (measured on an H200, torch 2.11: 21.9k tok/s against
17.6k for sdpa's mask and 8.7k for sdpa_varlen on a 3B Llama; bench/RESULTS-GPU.md), then torch's
``varlen_attn`` (FlashAttention kernels inside torch; not yet measured against flex), then ``flash_attention_2``
when the package is installed, then sdpa. ``model.attn_implementation: <name>`` overrides it.

``sdpa_varlen`` (CPU): the masked ``sdpa`` path makes PyTorch's CPU flash kernel score every query against every
key of the row, and its backward is the slowest op of a CPU step (bench/RESULTS.md); causal SDPA per sample skips
the upper triangle and all cross-sample blocks. Padding (always at the end of a row) gets a zero output, tied to
its q, k and v (times 0), so that a micro-batch of padding only still gives the q/k/v projections a (zero)
gradient, as every other rank's micro-batch does (FSDP2 needs the same set of gradients on every rank). When
every row holds one sample (``packing: padding``) the micro-batch takes one batched ``is_causal=True`` call.

Real tokens get exactly the attention of a per-sample run on every path (``tests/test_attention.py``; the CUDA
backends in ``tests/test_gpu.py``). Generation with a KV cache from a model trained with ``sdpa_varlen`` or
``varlen_attn`` runs ``sdpa`` (``kv_cache_attention``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from mft_components.distributed import to_device

__all__ = [
    "AUTO",
    "AUTO_ORDER",
    "BACKENDS",
    "FLEX_ATTENTION",
    "SDPA_VARLEN",
    "VARLEN_ATTN",
    "AttentionBackend",
    "attention_kwargs",
    "block_causal_block_mask",
    "cu_seqlens",
    "flex_attention_forward",
    "flex_flash_options",
    "known_attn_implementations",
    "kv_cache_attention",
    "resolve_attn_implementation",
    "sdpa_varlen_attention_forward",
    "segment_lengths",
    "varlen_attention_forward",
]

AUTO = "auto"
SDPA_VARLEN = "sdpa_varlen"
VARLEN_ATTN = "varlen_attn"
FLEX_ATTENTION = "flex_attention"
# mft's own implementations, registered with transformers' AttentionInterface below.
MFT_IMPLEMENTATIONS = (SDPA_VARLEN, VARLEN_ATTN)
# Training attentions that generation replaces: mft's own cannot decode with a KV cache, and flex_attention runs
# unfused (torch's math fallback, with a warning) in the eager layers generation uses. In their place: sdpa, or
# eager where the model softcaps attention logits (Gemma-2), which sdpa does not.
NO_KV_CACHE = {SDPA_VARLEN, VARLEN_ATTN, FLEX_ATTENTION}
KV_CACHE_ATTENTION = "sdpa"
SOFTCAP_KV_CACHE_ATTENTION = "eager"


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
    return _segments_from_position_ids(position_ids.expand(query.shape[0], -1))


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


@contextlib.contextmanager
def kv_cache_attention(config):
    """Inside the block, a model trained with an attention in ``NO_KV_CACHE`` runs ``sdpa`` (``eager`` when it
    softcaps attention logits; same weights, same math on an unpacked batch) so that it generates with a fused
    kernel and a KV cache; others run as they are. Layers compiled
    for training (``compile: auto`` on CUDA) run eagerly inside the block: generation's shapes change with every
    token and would recompile them.

    Args:
        config: the transformers config (shared by the model's modules; its sub-configs follow it).
    """
    current = getattr(config, "_attn_implementation", None)
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    with stance("force_eager") if stance is not None else contextlib.nullcontext():
        if current not in NO_KV_CACHE:
            yield
            return
        softcap = getattr(config, "attn_logit_softcapping", None)
        config._attn_implementation = SOFTCAP_KV_CACHE_ATTENTION if softcap else KV_CACHE_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = current


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


# flex_attention's kernel_options per device type, as `auto` chose them (`flex_flash_options`): FlashAttention's
# backend where it runs and matches, else torch's default (Triton).
FLEX_KERNEL_OPTIONS: dict[str, dict[str, Any]] = {}
FLEX_FLASH = {"BACKEND": "FLASH"}


def flex_flash_reason(device: torch.device | str | None = None) -> str | None:
    """Why flex_attention's FlashAttention backend (``kernel_options={"BACKEND": "FLASH"}``: FlashAttention's
    CuTe kernels, Hopper and Blackwell) cannot train on ``device`` (None when it can): this torch has no such
    backend, the ``flash_attn.cute`` kernels are not installed, no CUDA, or a GPU older than Hopper."""
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError:
        return f"torch {torch.__version__} has no flex_attention"
    if "FLASH" not in getattr(getattr(flex, "_Backend", None), "__args__", ()):
        return f"torch {torch.__version__}'s flex_attention has no FLASH backend"
    if not torch.cuda.is_available():
        return "needs CUDA"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "flash-attn's CuTe kernels (flash_attn.cute) are not installed"
    return gpu_too_old("flex_attention's FLASH backend", (9, 0), device)


def flex_flash_probe(device: torch.device | str, heads: int = 6, kv_heads: int = 2, length: int = 384) -> str | None:
    """Run flex_attention with the FLASH backend on a small packed, grouped-query problem (bf16, forward and
    backward) and compare it with the default backend; None when it ran and matched (bf16 rounding of a reduction
    over the row: 2 x length x eps), else why not."""
    from torch.nn.attention.flex_attention import flex_attention

    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, heads, length, 64, device=device, dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(1, kv_heads, length, 64, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
        ids = torch.repeat_interleave(torch.arange(3, device=device), length // 3)[None]
        mask = block_causal_block_mask(ids)
        results = []
        for options in (FLEX_FLASH, None):
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            out = torch.compile(flex_attention)(*leaves, block_mask=mask, enable_gqa=True, kernel_options=options)
            out.float().square().sum().backward()
            results.append([out.detach().float()] + [t.grad.float() for t in leaves])
        tolerance = 2 * length * torch.finfo(torch.bfloat16).eps
        for name, got, want in zip(("output", "dq", "dk", "dv"), *results):
            if (got - want).norm() > tolerance * want.norm():
                return f"its {name} differs from the Triton backend's by {float((got - want).norm() / want.norm()):.2e}"
    except Exception as e:  # noqa: BLE001 - any failure means: not this backend
        return f"it failed on a test problem: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    return None


def flex_flash_options(device: torch.device | str) -> tuple[dict[str, Any] | None, str]:
    """flex_attention's kernel_options under ``auto`` on ``device``: FLASH where ``flex_flash_reason`` allows it and
    ``flex_flash_probe`` matched, else None (torch's default); and what to print."""
    reason = flex_flash_reason(device)
    if reason is None:
        reason = flex_flash_probe(device)
    if reason is None:
        return dict(FLEX_FLASH), "FlashAttention backend (kernel_options BACKEND=FLASH)"
    return None, f"Triton backend (FLASH: {reason})"


# -------------------------------------------------------------------------------------------- the backends


def _sliding_window(config) -> int | None:
    """The sliding window of a config's sliding-attention layers, or None when no layer slides."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def _host_ids(batch: dict, host: dict | None) -> torch.Tensor:
    source = host if host is not None and host.get("sample_ids") is not None else batch
    if source.get("sample_ids") is None:
        raise ValueError("packed attention needs the collator's sample_ids in the batch")
    return source["sample_ids"]


def _segment_inputs(batch: dict, config, host: dict | None) -> dict:
    if batch.get("sample_ids") is not None or (host or {}).get("sample_ids") is not None:
        return {"segment_lengths": segment_lengths(_host_ids(batch, host))}
    if batch.get("position_ids") is not None:
        return {"segment_lengths": _segments_from_position_ids(batch["position_ids"])}
    raise ValueError("model.attn_implementation: sdpa_varlen needs sample_ids or position_ids in the batch")


def _block_mask_inputs(batch: dict, config, host: dict | None) -> dict:
    ids = batch.get("sample_ids")
    if ids is None:
        raise ValueError("model.attn_implementation: flex_attention needs the collator's sample_ids in the batch")
    window = _sliding_window(config)
    if window is not None and ids.shape[1] > window:
        raise ValueError(
            f"model.attn_implementation: flex_attention with mft's packed mask does not implement the "
            f"{window}-token sliding window of this model and rows are {ids.shape[1]} tokens; use "
            f"data.seq_len <= {window} or attn_implementation: flash_attention_2 / sdpa"
        )
    # A 4-D mask passes through transformers' mask construction unchanged (masking_utils: early exit).
    inputs = {"attention_mask": block_causal_block_mask(ids)}
    options = FLEX_KERNEL_OPTIONS.get(ids.device.type)
    if options:
        inputs["kernel_options"] = options
    return inputs


def _cu_seqlens_inputs(batch: dict, config, host: dict | None) -> dict:
    cu = to_device(cu_seqlens(_host_ids(batch, host)), batch["input_ids"].device)
    length = int(batch["input_ids"].shape[1])
    # transformers' FlashAttention keyword names; varlen_attention_forward reads the same ones
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": length, "max_length_k": length}


def _torch_has(module: str, attribute: str) -> str | None:
    try:
        found = hasattr(importlib.import_module(module), attribute)
    except ImportError:
        found = False
    return None if found else f"torch {torch.__version__} has no {module}.{attribute}"


def _package(name: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        return None if importlib.util.find_spec(name) is not None else f"the {name} package is not installed"

    return missing


def capability_reason(kernel: str, minimum: tuple[int, int], capability: tuple[int, int], gpu: str) -> str | None:
    """Why ``kernel`` cannot run on a GPU of compute ``capability`` (None when it can)."""
    if tuple(capability) >= minimum:
        return None
    return (f"{kernel} needs a GPU of compute capability {minimum[0]}.{minimum[1]} or newer "
            f"(this one: {gpu}, {capability[0]}.{capability[1]})")


def _all(*checks: Callable[[], str | None]) -> Callable[[], str | None]:
    def missing() -> str | None:
        return next((reason for reason in (check() for check in checks) if reason is not None), None)

    return missing


def gpu_too_old(what: str, minimum: tuple[int, int], device: torch.device | str | None = None) -> str | None:
    """Why ``what`` cannot run on the CUDA ``device`` (default: the current one); None when it can, or without CUDA."""
    if not torch.cuda.is_available():
        return None
    return capability_reason(what, minimum, torch.cuda.get_device_capability(device),
                             torch.cuda.get_device_name(device))


def _gpu_at_least(kernel: str, minimum: tuple[int, int]) -> Callable[[], str | None]:
    # Triton (flex_attention) needs Volta, FlashAttention (varlen_attn, flash-attn 2) Ampere, flash-attn 3
    # Hopper; CPU runs never ask.
    return lambda: gpu_too_old(kernel, minimum)


@dataclass(frozen=True)
class AttentionBackend:
    """One way of running attention on packed rows.

    Attributes:
        name: the ``model.attn_implementation`` value (a transformers ``AttentionInterface`` key).
        devices: device types it trains on.
        static_shapes: its per-micro-batch inputs are tensors whose shapes do not depend on the packing, so a
            whole decoder layer compiles once (``compile: auto`` compiles whole layers); otherwise only norms
            and MLPs are compiled.
        inputs: ``(batch, config, host_batch) -> forward kwargs`` computed once per micro-batch, or None when
            transformers derives the boundaries itself (from the restarting ``position_ids``).
        missing: ``() -> reason`` it cannot run in this environment, or None when it can.
        how: how the samples of a row are kept apart (printed with the choice).
    """

    name: str
    devices: tuple[str, ...]
    static_shapes: bool
    inputs: Callable[[dict, Any, dict | None], dict] | None
    missing: Callable[[], str | None]
    how: str


def _always() -> None:
    return None


BACKENDS: dict[str, AttentionBackend] = {
    b.name: b
    for b in (
        AttentionBackend(FLEX_ATTENTION, ("cuda",), True, _block_mask_inputs,
                         _all(lambda: _torch_has("torch.nn.attention.flex_attention", "flex_attention"),
                              _gpu_at_least(FLEX_ATTENTION, (7, 0))),  # Triton kernels
                         "flex_attention with a block-causal BlockMask per micro-batch"),
        AttentionBackend(VARLEN_ATTN, ("cuda",), True, _cu_seqlens_inputs,
                         _all(lambda: _torch_has("torch.nn.attention.varlen", "varlen_attn"),
                              _gpu_at_least(VARLEN_ATTN, (8, 0))),
                         "torch varlen_attn (FlashAttention) with cu_seqlens per micro-batch"),
        AttentionBackend("flash_attention_2", ("cuda",), False, _cu_seqlens_inputs,
                         _all(_package("flash_attn"), _gpu_at_least("flash_attention_2", (8, 0))),
                         "flash-attn varlen kernels with cu_seqlens per micro-batch"),
        AttentionBackend("flash_attention_3", ("cuda",), False, _cu_seqlens_inputs,
                         _all(_package("flash_attn_interface"), _gpu_at_least("flash_attention_3", (9, 0))),
                         "flash-attn 3 varlen kernels with cu_seqlens per micro-batch"),
        AttentionBackend(SDPA_VARLEN, ("cpu", "cuda"), False, _segment_inputs, _always,
                         "causal SDPA once per sample"),
        AttentionBackend("sdpa", ("cpu", "cuda"), True, None, _always,
                         "SDPA with transformers' block-diagonal mask from position_ids"),
        AttentionBackend("eager", ("cpu", "cuda"), True, None, _always,
                         "eager attention with transformers' block-diagonal mask from position_ids"),
    )
}

# What `attn_implementation: auto` tries, first available wins (see the module docstring for why this order).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": (FLEX_ATTENTION, VARLEN_ATTN, "flash_attention_2", "sdpa"),
    "cpu": (SDPA_VARLEN,),
}


def known_attn_implementations() -> list[str]:
    """Every value ``model.attn_implementation`` may take: ``auto``, transformers' ``eager``, the implementations
    registered with its ``AttentionInterface`` (sdpa, flash_attention_2, flex_attention, ...) and mft's own.
    ``mft validate`` checks a config against this list; whether one runs on the run's device, and whether a GPU
    kernel is installed, is ``resolve_attn_implementation``'s business.
    """
    from transformers import AttentionInterface

    return [AUTO, "eager", *dict.fromkeys([*AttentionInterface().valid_keys(), *MFT_IMPLEMENTATIONS, *BACKENDS])]


def resolve_attn_implementation(name: str | None, device: torch.device | str) -> tuple[str, str]:
    """The attention a run on ``device`` uses for ``model.attn_implementation: name``.

    Args:
        name: ``auto`` (or None), or an implementation name.
        device: where the model trains.

    Returns:
        (implementation, why): e.g. ``("flex_attention", "auto on cuda: flex_attention with a block-causal ...")``.

    Raises:
        ValueError: an unknown name, one that does not run on ``device``, one that is missing here (named with
            the reason), or one that cannot keep packed samples apart.
    """
    device_type = torch.device(device).type
    if name in (None, AUTO):
        tried = []
        for candidate in AUTO_ORDER.get(device_type, ("sdpa",)):
            reason = BACKENDS[candidate].missing()
            if reason is None:
                skipped = f" (not available: {'; '.join(tried)})" if tried else ""
                how = BACKENDS[candidate].how
                if candidate == FLEX_ATTENTION:  # its FlashAttention backend where it runs and matches
                    options, kernel = flex_flash_options(device)
                    FLEX_KERNEL_OPTIONS.pop(device_type, None)
                    if options:
                        FLEX_KERNEL_OPTIONS[device_type] = options
                    how = f"{how}, {kernel}"
                return candidate, f"auto on {device_type}: {how}{skipped}"
            tried.append(f"{candidate}: {reason}")
        return "sdpa", f"auto on {device_type}: {BACKENDS['sdpa'].how} (not available: {'; '.join(tried)})"
    if name not in known_attn_implementations():
        raise ValueError(f"model.attn_implementation: unknown {name!r}; expected {AUTO} or one of "
                         f"{', '.join(BACKENDS)}")
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(
            f"model.attn_implementation: {name!r} is a transformers attention mft cannot give packed-sample "
            f"boundaries to (samples would attend across each other); use auto or one of {', '.join(BACKENDS)}"
        )
    if device_type not in backend.devices:
        raise ValueError(
            f"model.attn_implementation: {name} trains on {' / '.join(backend.devices)} only, this run is on "
            f"{device_type}; use auto (here: {resolve_attn_implementation(AUTO, device)[0]})"
        )
    reason = backend.missing()
    if reason is not None:
        raise ValueError(f"model.attn_implementation: {name} cannot run here: {reason}; use auto")
    if name == FLEX_ATTENTION:  # set by hand: torch's default kernels (auto may choose FlashAttention's)
        FLEX_KERNEL_OPTIONS.pop(device_type, None)
    return name, f"{name} (set in the config): {backend.how}"


def attention_kwargs(batch: dict, config, host_batch: dict | None = None) -> dict:
    """Extra keyword arguments of the decoder's forward that the configured attention needs for this micro-batch.

    Args:
        batch: collator output on the model's device (``sample_ids`` preferred, else ``position_ids``).
        config: the transformers config (``_attn_implementation`` selects the attention).
        host_batch: the same micro-batch still on the host, if at hand: boundaries that must be known on the
            host (segment lengths, cu_seqlens) come from it instead of a device-to-host copy, which would wait
            for the device to finish its queued work.

    Returns:
        ``{}`` when transformers derives the boundaries itself (sdpa, eager), else the backend's inputs.

    Raises:
        ValueError: an explicit ``attention_mask`` in the batch with a backend that builds its own, or no way to
            find the samples.
    """
    name = getattr(config, "_attn_implementation", None)
    backend = BACKENDS.get(name)
    if backend is None or backend.inputs is None:
        return {}
    if batch.get("attention_mask") is not None:
        raise ValueError(
            f"model.attn_implementation: {name} takes sample boundaries from sample_ids and ignores an "
            "attention_mask; remove the mask from the batch or use attn_implementation: sdpa"
        )
    return backend.inputs(batch, config, host_batch)


def _register() -> None:
    # Attention functions only: with no mask function registered under these names, transformers builds no mask
    # and skips its packed-sequence detection, which reads a value back from the device (masking_utils:
    # "custom attention without equivalent mask creation").
    # flex_attention: mft's function in place of transformers' (same name, so configs, masks and generation's
    # swap to sdpa are unchanged); it hands every call that is not a packed training row back to transformers'.
    from transformers import AttentionInterface

    for name, function in ((SDPA_VARLEN, sdpa_varlen_attention_forward), (VARLEN_ATTN, varlen_attention_forward),
                           (FLEX_ATTENTION, flex_attention_forward)):
        AttentionInterface.register(name, function)


_register()
