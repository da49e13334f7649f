"""Packed-sequence attention: every attention mft trains with, in one table, and the ``auto`` choice per device.

A packed row holds several samples that must never attend to each other. Each backend below keeps them apart in
its own way, from the ``sample_ids`` of the micro-batch, computed once per micro-batch (``packed_attention.py``
draws it: per-sample SDPA, a block-causal BlockMask, cu_seqlens); for ``sdpa`` / ``eager``, transformers builds
the block-diagonal [B, 1, T, T] mask from the restarting position_ids.

``BACKENDS`` is the table (devices, whether whole decoder layers compile with static shapes, how a micro-batch's
boundaries reach the attention); ``AUTO_ORDER`` is what ``attn_implementation: auto`` tries, per device type,
first available wins; ``resolve_attn_implementation`` is the only place that decides. Nothing else in mft
chooses an attention. The CUDA order is flex_attention (measured on an H200, torch 2.11: 21.9k tok/s against
17.6k for sdpa's mask and 8.7k for sdpa_varlen on a 3B Llama; bench/RESULTS-GPU.md), then torch's
``varlen_attn`` (FlashAttention kernels inside torch; not yet measured against flex), then ``flash_attention_2``
when the package is installed, then sdpa. ``model.attn_implementation: <name>`` overrides it.

Real tokens get exactly the attention of a per-sample run on every path (``tests/test_attention.py``; the CUDA
backends in ``tests/test_gpu.py``). Generation with a KV cache from a model trained with ``sdpa_varlen`` or
``varlen_attn`` runs ``sdpa`` (``kv_cache_attention``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mft_components.device import gpu_too_old, to_device
from mft_components.models.packed_attention import (
    SDPA_VARLEN,
    VARLEN_ATTN,
    block_causal_block_mask,
    cu_seqlens,
    flex_attention_forward,
    sdpa_varlen_attention_forward,
    segment_lengths,
    segments_from_position_ids,
    varlen_attention_forward,
)

__all__ = ["AUTO", "AUTO_ORDER", "BACKENDS", "FLEX_ATTENTION", "FLEX_KERNEL_OPTIONS", "AttentionBackend",
           "attention_kwargs", "flex_flash_options", "flex_flash_reason", "known_attn_implementations",
           "kv_cache_attention", "resolve_attn_implementation"]

AUTO = "auto"
FLEX_ATTENTION = "flex_attention"
# mft's own implementations, registered with transformers' AttentionInterface below.
MFT_IMPLEMENTATIONS = (SDPA_VARLEN, VARLEN_ATTN)
# Training attentions that generation replaces: mft's own cannot decode with a KV cache, and flex_attention runs
# unfused (torch's math fallback, with a warning) in the eager layers generation uses. In their place: sdpa, or
# eager where the model softcaps attention logits (Gemma-2), which sdpa does not.
NO_KV_CACHE = {SDPA_VARLEN, VARLEN_ATTN, FLEX_ATTENTION}
KV_CACHE_ATTENTION = "sdpa"
SOFTCAP_KV_CACHE_ATTENTION = "eager"


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


# -------------------------------------------------------------------------------------------- the backends


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
        return {"segment_lengths": segments_from_position_ids(batch["position_ids"])}
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


def _all(*checks: Callable[[], str | None]) -> Callable[[], str | None]:
    def missing() -> str | None:
        return next((reason for reason in (check() for check in checks) if reason is not None), None)

    return missing


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
