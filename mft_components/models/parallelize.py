"""Parallelising an ``MFTModel``: activation checkpointing, per-layer compile, FSDP2 sharding, and back.

Order of the steps (torchtitan's): activation checkpointing, then `torch.compile` per decoder layer, then FSDP2 —
`fully_shard` on every decoder layer, then on the root `MFTModel` so that the root's parameter group holds the
embeddings, the final norm and `lm_head` and unshards them inside `MFTModel.forward` (where the chunked loss reads
`lm_head.weight`). Sharding happens while the parameters are still on the meta device; `make_param_like` then cuts
each streamed full tensor down to this rank's shard (``weights.py``), and `gather_state_dict` gathers the shards
back into full tensors for a checkpoint.

NF4 weights shard too: torchao's `NF4Tensor` implements FSDP2's `fsdp_pre_all_gather` / `fsdp_post_all_gather`
(the 4-bit data, block scales and scaler factors are all-gathered; dequantisation happens in the matmul).
"""

from __future__ import annotations

import logging
import sys
import types

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mft_components.device import gpu_too_old
from mft_components.distributed import get_rank, get_world_size
from mft_components.models.lora import NF4Tensor, hf_key, to_nf4

__all__ = ["ACTIVATION_CHECKPOINTING", "COMPILE_SCOPES", "activation_checkpointing_mode",
           "apply_activation_checkpointing", "resolve_compile", "compile_layers", "remove_hub_kernel_routing",
           "CompileWatch", "report_compile", "shard_model", "reshard", "make_param_like", "gather_state_dict"]


def _device_mesh():
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (get_world_size(),))


# `model.activation_checkpointing`: what is recomputed in backward instead of kept from forward.
ACTIVATION_CHECKPOINTING = {
    False: "nothing (every activation kept)",
    "full": "every decoder layer (least memory; one extra forward)",
    "every_other": "every other decoder layer (about half the memory saving for half the recompute)",
    "selective": "the cheap ops of every layer (norms, activations, RoPE, LoRA's scaling); matmul and attention "
                 "outputs are kept",
}


def activation_checkpointing_mode(value) -> str | bool:
    """Normalise ``model.activation_checkpointing`` (``true`` means ``full``).

    Raises:
        ValueError: a value that is not false/true or one of ``ACTIVATION_CHECKPOINTING``'s names.
    """
    if value is None or value is False:
        return False
    if value is True:
        return "full"
    if value not in ACTIVATION_CHECKPOINTING:
        names = ", ".join(str(k).lower() for k in ACTIVATION_CHECKPOINTING) + ", true"
        raise ValueError(f"model.activation_checkpointing: expected one of {names}; got {value!r}")
    return value


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _saved_ops() -> frozenset:
    """Ops whose outputs selective checkpointing keeps: the matmuls and the attention kernels (expensive to
    recompute); everything else in a layer is elementwise or a reduction, recomputed in backward."""
    global _SAVED_OPS
    if _SAVED_OPS is None:
        aten = torch.ops.aten
        names = [(aten, n) for n in ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
                                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                                     "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                                     "_efficient_attention_forward")]
        ops = {getattr(getattr(ns, n), "default") for ns, n in names if hasattr(ns, n)}
        if hasattr(torch.ops.higher_order, "flex_attention"):
            ops.add(torch.ops.higher_order.flex_attention)
        varlen = getattr(getattr(torch.ops, "torch_attn", None), "_varlen_attn", None)
        if varlen is not None:
            ops.add(varlen.default)
        _SAVED_OPS = frozenset(ops)
    return _SAVED_OPS


_SAVED_OPS = None


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpointing(model: nn.Module, mode: str | bool = "full") -> None:
    """Recompute decoder layers (or their cheap ops) in backward (transformers' per-layer checkpointing,
    non-reentrant; ``mode`` as ``model.activation_checkpointing``, see ``ACTIVATION_CHECKPOINTING``).

    transformers' GradientCheckpointingLayer keeps parameter names unchanged (no wrapper module), so state
    dicts and FSDP2's per-layer groups are the same with or without it. ``selective`` is torch's selective
    activation checkpointing (a policy per op: save matmul and attention outputs, recompute the rest).
    """
    mode = activation_checkpointing_mode(mode)
    if not mode:
        return
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = _selective_context
    enable = getattr(model.hf_model, "activation_checkpointing_enable", None)
    if enable is not None:  # newer transformers: the old name is a deprecated alias that warns on every rank
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "every_other":
        for i, layer in enumerate(model.decoder_layers()):
            layer.gradient_checkpointing = i % 2 == 0


# `model.compile`, resolved per run: what `torch.compile` covers.
COMPILE_SCOPES = {
    "off": "nothing compiled",
    "layers": "whole decoder layers (attention included: its inputs are tensors of fixed shape)",
    "norms_mlp": "each decoder layer's norms and MLP (the attention stays eager: its inputs change with the packing)",
}


def resolve_compile(value, device: torch.device | str, static_attention: bool, moe: bool) -> tuple[str, str]:
    """What ``model.compile`` compiles on ``device``: a ``COMPILE_SCOPES`` key and why.

    ``auto`` compiles on CUDA (whole layers where the attention's per-micro-batch inputs have static shapes:
    flex_attention's BlockMask, varlen_attn's cu_seqlens, sdpa's mask; norms and MLP otherwise) and not on the
    CPU (a compilation costs ~30 s there, which short CPU runs do not earn back; bench/RESULTS.md). ``true``
    compiles on any device with the same scope; ``false`` compiles nothing. MoE layers compile their norms and
    attention-free children only (routing is data-dependent).

    Raises:
        ValueError: a value other than auto/true/false.
    """
    if value not in ("auto", True, False, None):
        raise ValueError(f"model.compile: expected auto, true or false; got {value!r}")
    device_type = torch.device(device).type
    if value in (False, None) or (value == "auto" and device_type != "cuda"):
        why = "compile: false" if value in (False, None) else f"auto on {device_type}"
        return "off", f"{COMPILE_SCOPES['off']} ({why})"
    if value == "auto":  # inductor's Triton kernels need Volta or newer
        reason = gpu_too_old("torch.compile (Triton)", (7, 0), device)
        if reason is not None:
            return "off", f"{COMPILE_SCOPES['off']} (auto on cuda: {reason})"
    scope = "layers" if static_attention and not moe else "norms_mlp"
    why = f"auto on {device_type}" if value == "auto" else "set in the config"
    return scope, f"{COMPILE_SCOPES[scope]} ({why})"


def compile_layers(model: nn.Module, whole: bool = False, backend: str = "inductor") -> list[str]:
    """`torch.compile` each decoder layer in place: whole (``whole=True``) or its norms and dense MLP; returns
    the compiled child names (``["forward"]`` for whole layers). ``backend``: torch.compile's (the CPU tests use
    ``aot_eager``: dynamo and AOTAutograd as on a GPU, without generating kernels).

    Whole layers: each layer's ``forward`` is compiled, attention included; for backends whose per-micro-batch
    inputs are tensors of a fixed shape (BlockMask, cu_seqlens, sdpa's mask) one graph serves every packing
    (tests/test_models.py counts them). Compiling ``forward`` rather than the module keeps FSDP2's hooks,
    which run around ``forward``, out of the graph, and activation checkpointing inside it: dynamo traces the
    checkpoint as a higher-order op, so the recomputation is compiled too. That needs a layer body without
    Python side effects, which is why the hub-kernel routing wrappers come off first
    (``remove_hub_kernel_routing``).

    Norms and MLP: the attention module stays eager when ``sdpa_varlen`` calls SDPA once per sample (its Python
    control flow depends on the sample lengths of each micro-batch: a compiled layer would recompile for every
    new packing and hit dynamo's recompile limit). MoE blocks stay eager too (data-dependent routing). The
    compiled children are where the elementwise work is (RMSNorm's float32 round trip, SiLU x up, LoRA's scale
    and sum), and AOTAutograd recomputes such cheap ops in backward instead of saving them.
    ``nn.Module.compile`` and an instance ``forward`` keep parameter names, so checkpoints and FSDP2 groups do
    not change. Whether dynamo really compiled them is ``CompileWatch``'s to say, once a step has run.
    """
    for layer in model.decoder_layers():
        remove_hub_kernel_routing(layer)
    if whole:
        for layer in model.decoder_layers():
            layer.forward = torch.compile(layer.forward, backend=backend)
        return ["forward"]
    compiled = set()
    for layer in model.decoder_layers():
        for name, child in layer.named_children():
            attention = type(child).__name__.endswith(("Attention", "Attn")) or name in ("self_attn", "attention")
            if attention or hasattr(child, "experts") or next(child.parameters(), None) is None:
                continue
            child.compile(backend=backend)
            compiled.add(name)
    return sorted(compiled)


def remove_hub_kernel_routing(module: nn.Module) -> int:
    """Give every submodule whose class ``forward`` the ``kernels`` package wrapped (transformers' attention
    classes: ``@use_kernelized_func(apply_rotary_pos_emb)``) its own, unwrapped forward; returns how many.

    The wrapper routes calls of a hub kernel function to the module's private copy through a global
    ``CompileableContextVar`` that it sets and resets on every call. mft never loads hub kernels
    (``kernels.kernelize``), so the routing does nothing here, but under ``torch.compile`` its mutation of that
    global is a side effect: inside activation checkpointing (a higher-order op) dynamo refuses it ("HOP: Unsafe
    side effect ... CompileableContextVar") and the layer runs eagerly, and after a flex_attention call dynamo
    (torch 2.13) leaves the global set, so the next layer's guard fails and recompiles. The attention computed is
    the same with and without the wrapper.
    """
    count = 0
    for child in module.modules():
        forward = type(child).forward
        if "_kernel_funcs" in child.__dict__ and "forward" not in child.__dict__ and hasattr(forward, "__wrapped__"):
            child.forward = types.MethodType(forward.__wrapped__, child)
            count += 1
    return count


def _dynamo_counts() -> tuple[int, dict[str, int], int]:
    """(graphs compiled, graph breaks by reason, frames that failed to compile) so far in this process."""
    from torch._dynamo.utils import counters

    failed = counters["frames"]["total"] - counters["frames"]["ok"]
    return counters["stats"]["unique_graphs"], dict(counters["graph_break"]), failed


class _SuppressedErrors(logging.Handler):
    """Collects the compile errors dynamo suppresses (``suppress_errors``: ``compile: auto``) while attached."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        text = f"{type(error).__name__}: {error}" if error is not None else record.getMessage()
        self.reasons.append(text.strip().splitlines()[0][:300] if text.strip() else "compile error")


class CompileWatch:
    """Checks that the compile a run announced ran: graphs and graph breaks per decoder layer, from dynamo's
    counters, while the layers run until :meth:`report` (the recipe calls it after the first optimizer step).

    A forward pre-hook and a forward hook on each decoder layer read ``torch._dynamo.utils.counters`` around the
    layer's call (compilation happens inside it, in forward; the calls are sequential), so each graph, graph
    break and suppressed compile error is put down to the layer that caused it. The hooks come off at the report.

    Args:
        model: the MFTModel whose layers ``compile_layers`` compiled.
        label: what the run said it compiles (``COMPILE_SCOPES[scope]``), repeated in the report.
        auto: ``model.compile: auto`` (errors suppressed: a layer that fails runs eagerly).
    """

    def __init__(self, model: nn.Module, label: str, auto: bool):
        self.label, self.auto = label, auto
        self.start = _dynamo_counts()
        self.layers = [{"graphs": 0, "breaks": {}, "errors": []} for _ in model.decoder_layers()]
        self._handles = []
        self._pending: dict[int, tuple] = {}
        for i, layer in enumerate(model.decoder_layers()):
            self._handles.append(layer.register_forward_pre_hook(lambda *_, i=i: self._enter(i)))
            self._handles.append(layer.register_forward_hook(lambda *_, i=i: self._exit(i)))

    def _enter(self, i: int) -> None:
        handler = _SuppressedErrors()
        logging.getLogger("torch._dynamo.convert_frame").addHandler(handler)
        self._pending[i] = (_dynamo_counts(), handler)

    def _exit(self, i: int) -> None:
        (graphs, breaks, failed), handler = self._pending.pop(i)
        logging.getLogger("torch._dynamo.convert_frame").removeHandler(handler)
        now_graphs, now_breaks, now_failed = _dynamo_counts()
        stats = self.layers[i]
        stats["graphs"] += now_graphs - graphs
        for reason, n in now_breaks.items():
            if n > breaks.get(reason, 0):
                stats["breaks"][reason] = stats["breaks"].get(reason, 0) + n - breaks.get(reason, 0)
        if now_failed > failed:
            stats["errors"] += handler.reasons or [f"{now_failed - failed} frame(s) failed to compile"]

    def report(self) -> tuple[bool, str]:
        """Stop watching; (whether every layer ran compiled, the lines to print).

        A layer ran compiled when its calls caused no graph break and no compile error (a layer whose calls
        compiled no graph reuses an earlier layer's); the run as a whole must have compiled at least one graph.
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []
        graphs, breaks, failed = _dynamo_counts()
        graphs -= self.start[0]
        n_breaks = sum(breaks.values()) - sum(self.start[1].values())
        problems, first_bad = [], None
        for i, stats in enumerate(self.layers):
            reasons = [f"graph break x{n}: {_break_reason(r)}" for r, n in stats["breaks"].items()] + stats["errors"]
            if reasons:
                problems.append(f"layer {i}: {'; '.join(reasons)}")
                first_bad = i if first_bad is None else first_bad
            elif first_bad is not None and stats["graphs"] == 0:  # the same code as the layer that broke
                problems.append(f"layer {i}: runs layer {first_bad}'s compiled code, with its graph breaks")
        head = (f"compile check after the first step: {graphs} graph{'s' * (graphs != 1)}, {n_breaks} graph "
                f"break{'s' * (n_breaks != 1)}, {failed - self.start[2]} failed frame(s) ({self.label})")
        if graphs == 0 and not problems:
            problems.append("no graph was compiled (dynamo skipped every layer)")
        if not problems:
            return True, f"{head}: every decoder layer runs compiled"
        fallback = "falls back to eager there" if self.auto else "runs eagerly there (compile: true)"
        return False, f"{head}\nwarning: compile did not hold, the run {fallback}:\n  " + "\n  ".join(problems)


def _break_reason(text: str) -> str:
    """A graph break counter key (dynamo's message) in one line: its first line and its explanation."""
    lines = [line.strip() for line in text.strip().splitlines()]
    explanation = next((line for line in lines if line.startswith("Explanation:")), "")
    return " ".join(filter(None, [lines[0] if lines else "?", explanation]))[:300]


def report_compile(model: nn.Module, show: bool = True) -> bool:
    """Print what ``model.compile_watch`` saw (rank 0: ``show``), once; True when every layer ran compiled or
    nothing was to be compiled. A layer that fell back to eager is a warning on stderr naming it and why."""
    watch = getattr(model, "compile_watch", None)
    if watch is None:
        return True
    model.compile_watch = None
    ok, text = watch.report()
    if show:
        print("\n".join(f"[mft] {line}" if not line.startswith("  ") else line for line in text.splitlines()),
              file=sys.stdout if ok else sys.stderr, flush=True)
    return ok


def shard_model(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
    activation_checkpointing: bool | str = False,
    compile: str = "off",
    reshard_after_forward: bool = True,
) -> None:
    """Apply activation checkpointing, per-layer compile and FSDP2 to an `MFTModel` (meta or real parameters).

    Args:
        model: the MFTModel (its `decoder_layers()` are the sharding units; the root takes the rest).
        param_dtype: compute dtype FSDP2 all-gathers parameters in (MixedPrecisionPolicy).
        reduce_dtype: dtype gradients are reduce-scattered in (float32 keeps bf16 training stable).
        cpu_offload: keep sharded parameters, gradients and optimizer state on CPU (CPUOffloadPolicy).
        activation_checkpointing: what to recompute in backward (``ACTIVATION_CHECKPOINTING``).
        compile: a ``COMPILE_SCOPES`` key (``resolve_compile``): whole layers, norms and MLP, or off.
        reshard_after_forward: free unsharded layer parameters after forward (ZeRO-3); False = ZeRO-2.
    """
    apply_activation_checkpointing(model, activation_checkpointing)
    mesh = _device_mesh()
    kwargs = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    )
    for layer in model.decoder_layers():
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    # After fully_shard: it gives each layer a subclass whose forward wraps the class's again, and transformers
    # checkpoints in the outermost wrapper only; a forward compiled before would be an inner one, never checkpointed.
    if compile != "off":
        compile_layers(model, whole=compile == "layers")
    # The root group (embeddings, final norm, lm_head) is needed right after the last layer for the loss:
    # keeping it unsharded after forward saves one all-gather at the start of backward.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    if hasattr(model, "generate"):  # generation (code evaluation) gathers the root's parameters like forward
        register_fsdp_forward_method(model, "generate")


def reshard(model: nn.Module) -> None:
    """Put FSDP2 parameters back into their sharded form after forwards without backward (evaluation, generation).

    FSDP2 leaves the root module's parameters unsharded after its forward until the backward reshards them; with
    no backward, the module would keep registering the unsharded tensors, which are not the parameters the
    optimizer holds, and the next checkpoint or optimizer step would miss them.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def make_param_like(old: torch.Tensor, full: torch.Tensor) -> nn.Parameter:
    """A parameter holding `full`'s values laid out like `old`: plain, NF4, or this rank's FSDP2 shard of either.

    Each rank reads the full tensor and keeps only its rows (no communication). An NF4 weight is quantised
    whole and then split, as FSDP2 does: the scaler mean is per tensor, so every shard must share it.

    Args:
        old: the (meta) parameter being replaced.
        full: the full tensor, already on the target device and in the target dtype.

    Returns:
        nn.Parameter with `old.requires_grad`.
    """
    if isinstance(old, DTensor):
        local_old = old._local_tensor
        if isinstance(local_old, NF4Tensor):
            nf4 = to_nf4(full.contiguous(), local_old.block_size, local_old.scaler_block_size)
            mesh = old.device_mesh
            chunk = list(torch.chunk(nf4, mesh.size(0), dim=0))[mesh.get_local_rank(0)]
            # DTensor.from_local would view() the NF4 chunk, which NF4Tensor does not support; build it directly.
            sharded = DTensor(
                chunk,
                DTensorSpec(mesh=mesh, placements=old.placements,
                            tensor_meta=TensorMeta(shape=old.size(), stride=old.stride(), dtype=old.dtype)),
                requires_grad=False,
            )
            return nn.Parameter(sharded, requires_grad=False)
        sharded = distribute_tensor(full, old.device_mesh, old.placements, src_data_rank=None)
        return nn.Parameter(sharded, requires_grad=old.requires_grad)
    if isinstance(old, NF4Tensor):
        return nn.Parameter(to_nf4(full.contiguous(), old.block_size, old.scaler_block_size), requires_grad=False)
    return nn.Parameter(full, requires_grad=old.requires_grad)


@torch.no_grad()
def gather_state_dict(model: nn.Module, adapter_only: bool, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of the model's weights on rank 0; `{}` on other ranks.

    One parameter is all-gathered at a time (every rank must call this), so no rank ever holds more than the
    model's shards plus one full tensor. NF4 weights are dequantised. Keys are the transformers model's
    (`model.layers.0.self_attn.q_proj.weight`, adapters `....q_proj.lora_a.weight`), tied weights once.

    Args:
        model: an MFTModel (sharded or not) or a bare transformers model.
        adapter_only: only the LoRA adapter weights.
        dtype: cast floating tensors to this dtype (default: keep).

    Returns:
        dict name -> CPU tensor on rank 0, {} elsewhere.
    """
    rank = get_rank()
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        adapter = ".lora_a." in name or ".lora_b." in name
        if adapter_only and not adapter:
            continue
        tensor = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if isinstance(tensor, NF4Tensor):
            tensor = tensor.get_original_weight()
        if rank == 0:
            tensor = tensor.detach().to("cpu", copy=True)
            out[hf_key(name)] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        del tensor
    return out
