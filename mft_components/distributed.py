"""Process group, FSDP2 sharding, activation checkpointing, per-layer compile, reductions, state-dict gathering.

Order of the parallelisation steps (torchtitan's): activation checkpointing, then `torch.compile` per decoder
layer, then FSDP2 — `fully_shard` on every decoder layer, then on the root `MFTModel` so that the root's
parameter group holds the embeddings, the final norm and `lm_head` and unshards them inside
`MFTModel.forward` (where the chunked loss reads `lm_head.weight`). Sharding happens while the parameters are
still on the meta device; `make_param_like` then cuts each streamed full tensor down to this rank's shard.

NF4 weights shard too: torchao's `NF4Tensor` implements FSDP2's `fsdp_pre_all_gather` / `fsdp_post_all_gather`
(the 4-bit data, block scales and scaler factors are all-gathered; dequantisation happens in the matmul).

Hangs: the process group gets a timeout (the recipes' ``distributed_timeout_s``), so a collective that a rank never
joins fails on the ranks waiting in it instead of blocking forever. To say WHICH rank is missing, every rank's
heartbeat thread bumps a counter in the rendezvous store (its own connection) each second; :func:`collective_timeout_message` looks for
the counters that stopped (a stopped, frozen or killed process) when a collective times out.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from mft_components.lora import NF4Tensor, hf_key, to_nf4


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


HEARTBEAT_S = 1.0  # seconds between two heartbeats of a rank
_heartbeat: "_Heartbeat | None" = None


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) or run as a single process.

    Args:
        timeout_s: how long a collective may wait for the other ranks before it fails (None: torch's default,
            30 minutes for gloo, 10 for nccl). Applies to the group made here, not to one that already exists.

    Returns:
        (rank, world_size, device): device is cuda:LOCAL_RANK when CUDA is available, else cpu.
    """
    global _heartbeat
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not is_distributed():
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=timeout)
        _heartbeat = _Heartbeat.connect(get_rank(), get_world_size())
    return get_rank(), get_world_size(), device


def destroy_distributed() -> None:
    """Tear the process group down (no-op when none)."""
    global _heartbeat
    if is_distributed():
        dist.barrier()
        if _heartbeat is not None:
            _heartbeat.stop()
            _heartbeat = None
        dist.destroy_process_group()


class _Heartbeat(threading.Thread):
    """Adds 1 to this rank's counter in the store every ``HEARTBEAT_S`` (a daemon: it never keeps a process
    alive); a process that is stopped or frozen stops counting, one that waits in a collective does not."""

    def __init__(self, store, rank: int, world_size: int):
        super().__init__(name="mft-heartbeat", daemon=True)
        self.store, self.rank, self.world_size = store, rank, world_size
        self._stopped = threading.Event()

    @classmethod
    def connect(cls, rank: int, world_size: int) -> "_Heartbeat | None":
        """Start beating through a connection of its own to the rendezvous store (torchrun's MASTER_ADDR and
        MASTER_PORT), so that it never waits behind the process group's use of the store; None without one."""
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=60))
        except (KeyError, ValueError, RuntimeError):
            return None
        beat = cls(dist.PrefixStore("mft_heartbeat", store), rank, world_size)
        beat.start()
        return beat

    def run(self) -> None:
        while True:
            try:
                self.store.add(str(self.rank), 1)
            except Exception:  # the store is gone: the run is ending
                return
            if self._stopped.wait(HEARTBEAT_S):
                return

    def stop(self) -> None:
        self._stopped.set()

    def silent_ranks(self, window_s: float) -> list[int] | None:
        """Other ranks whose counter did not move during ``window_s``; None when the store cannot be read."""
        try:
            before = [self.store.add(str(r), 0) for r in range(self.world_size)]
            time.sleep(window_s)
            after = [self.store.add(str(r), 0) for r in range(self.world_size)]
        except Exception:
            return None
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]


def is_collective_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a collective that timed out (gloo: "Timed out waiting ...", nccl: "... timeout")."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and is_distributed() and ("timed out" in text or "timeout" in text)


def collective_timeout_message(error: BaseException, timeout_s: float | None) -> str:
    """What to tell a person when a collective timed out on this rank: which ranks stopped answering.

    Watches the other ranks' heartbeats for a few seconds (a frozen rank's counter stands still).
    """
    rank = get_rank()
    limit = f"distributed_timeout_s={timeout_s:g}" if timeout_s else "the process group's timeout"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    head = f"rank {rank}: a collective did not complete within {limit} ({first_line})"
    silent = _heartbeat.silent_ranks(4 * HEARTBEAT_S) if _heartbeat is not None else None
    if silent:
        who = ", ".join(f"rank {r}" for r in silent)
        return (f"{head}.\n{who} stopped answering (its process is stopped, frozen or gone): the run ends. Restart "
                f"it (resume: auto continues from the last checkpoint); raise distributed_timeout_s if that rank "
                f"was only slow (e.g. writing a large checkpoint)")
    if silent is None:
        return f"{head}; the other ranks could not be asked which one is stuck: the run ends"
    return (f"{head}.\nEvery rank still answers, so they wait in different collectives: a rank is busy for longer "
            f"than the timeout (raise distributed_timeout_s) or a recipe change made ranks run different collectives")


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `t` over ranks in place (no-op single-process) and return it; a CPU tensor under NCCL, which reduces
    CUDA tensors only, goes through the GPU."""
    if not is_distributed():
        return t
    if dist.get_backend(group) == "nccl" and t.device.type != "cuda":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=group)
        t.copy_(on_gpu.to(t.device))
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _device_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (get_world_size(),))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer in backward (transformers' per-layer checkpointing, non-reentrant).

    transformers' GradientCheckpointingLayer keeps parameter names unchanged (no wrapper module), so state
    dicts and FSDP2's per-layer groups are the same with or without it.
    """
    model.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_layers(model: nn.Module) -> list[str]:
    """`torch.compile` the norms and dense MLP of each decoder layer in place; returns the compiled child names.

    The attention module stays eager: ``sdpa_varlen`` calls SDPA once per sample, so its Python control flow
    depends on the sample lengths of each micro-batch and a compiled layer would recompile for every new packing
    (and hit dynamo's recompile limit). MoE blocks stay eager too (data-dependent routing). The compiled children
    are where the elementwise work is (RMSNorm's float32 round trip, SiLU x up, LoRA's scale and sum), and
    AOTAutograd recomputes such cheap ops in backward instead of saving them. ``nn.Module.compile`` keeps
    parameter names, so checkpoints and FSDP2 groups do not change.
    """
    compiled = set()
    for layer in model.decoder_layers():
        for name, child in layer.named_children():
            attention = type(child).__name__.endswith(("Attention", "Attn")) or name in ("self_attn", "attention")
            if attention or hasattr(child, "experts") or next(child.parameters(), None) is None:
                continue
            child.compile()
            compiled.add(name)
    return sorted(compiled)


def shard_model(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    compile: bool = False,
    reshard_after_forward: bool = True,
) -> None:
    """Apply activation checkpointing, per-layer compile and FSDP2 to an `MFTModel` (meta or real parameters).

    Args:
        model: the MFTModel (its `decoder_layers()` are the sharding units; the root takes the rest).
        param_dtype: compute dtype FSDP2 all-gathers parameters in (MixedPrecisionPolicy).
        reduce_dtype: dtype gradients are reduce-scattered in (float32 keeps bf16 training stable).
        cpu_offload: keep sharded parameters, gradients and optimizer state on CPU (CPUOffloadPolicy).
        activation_checkpointing: recompute each decoder layer in backward.
        compile: torch.compile each decoder layer's norms and MLP (`compile_layers`).
        reshard_after_forward: free unsharded layer parameters after forward (ZeRO-3); False = ZeRO-2.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_layers(model)
    mesh = _device_mesh()
    kwargs = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    )
    for layer in model.decoder_layers():
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
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
    from torch.distributed.fsdp import FSDPModule

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
            from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

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
