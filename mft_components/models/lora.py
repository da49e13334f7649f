"""LoRA: a linear layer with a frozen base weight (plain or torchao NF4) plus a trainable low-rank update.

    x ──> base: x @ W^T (+ b)  ───────────────────────────────┐
     │                                                      (+) ──> y
     └──> dropout ──> lora_a (in -> r) ──> lora_b (r -> out) ──> * scale

    scale = alpha / rank          (LoRA)
    scale = alpha / sqrt(rank)    (rsLoRA, use_rslora=True)

`lora_a` starts Kaiming-uniform and `lora_b` at zero, so a fresh adapter computes exactly the base layer.
The base weight keeps the name `weight` (and `bias`), so a Hugging Face state dict loads into a model whose
`nn.Linear`s were swapped for `LoRALinear`s without renaming. With `quantize_base=True` the weight is a
torchao `NF4Tensor` (QLoRA): 4-bit blocks of 64 values plus double-quantised scales; the matmul runs through
`nf4_linear`, which dequantises on the fly, never needs a gradient for the base and dequantises again in backward
(never keeping a dense copy of the weight from forward to backward, eager or compiled).

Adapter checkpoints use PEFT's key names (`base_model.model.<module path>.lora_A.weight`) so that
`peft.PeftModel.from_pretrained(hf_model, dir)` loads what we train.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import to_nf4
from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as _torchao_nf4
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, SubclassTensorArgs

from mft_components.models.expert_lora import fold_param_adapters, param_adapters_to_peft, peft_to_param_adapters


class LoRAOptions(TypedDict, total=False):
    """The keys of a config's ``model.lora`` (``mft validate`` checks them against this)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: list | str | None  # None: the architecture's default; "all-linear"; or module names
    use_rslora: bool

# torchao quantises 1M values at a time through a [chunk, 16] distance matrix (32 MiB in bf16, plus its abs):
# 64K values keep that transient at ~2 MiB, so loading a QLoRA model peaks near its final size.
_torchao_nf4.CHUNK_SIZE = min(_torchao_nf4.CHUNK_SIZE, 1 << 16)

NF4_BLOCK_SIZE = 64
NF4_SCALER_BLOCK_SIZE = 256
# Scaler blocks of a quantised weight must split evenly across FSDP ranks; keep their count a multiple of this.
_NF4_SHARDABLE_RANKS = 8


def nf4_block_sizes(numel: int) -> tuple[int, int] | None:
    """Pick torchao NF4 block sizes for a weight with `numel` elements.

    The quantisation block is always 64 values (QLoRA's choice). The scales of those blocks are quantised again
    in *scaler blocks*; torchao's default is 256 scales per scaler block. A weight must hold a whole number of
    scaler blocks, and for FSDP2 each rank's row-shard must too, so we use the largest power of two <= 256
    that leaves a number of scaler blocks divisible by 8 (shardable over 1, 2, 4 or 8 ranks). Real models get
    256; a tiny test model's 32x64 weight gets 4. The choice depends only on the shape, never on world size,
    so a model quantises identically on 1 or N ranks.

    Args:
        numel: number of elements of the weight.

    Returns:
        (block_size, scaler_block_size), or None when `numel` is not a multiple of 64 (keep the weight as is).
    """
    if numel % NF4_BLOCK_SIZE:
        return None
    n_blocks = numel // NF4_BLOCK_SIZE
    scaler = NF4_SCALER_BLOCK_SIZE
    while scaler > 1 and n_blocks % (scaler * _NF4_SHARDABLE_RANKS):
        scaler //= 2
    while scaler > 1 and n_blocks % scaler:
        scaler //= 2
    return NF4_BLOCK_SIZE, scaler


def quantize_nf4(weight: torch.Tensor) -> NF4Tensor:
    """Quantise a 2-D weight (any device, meta included) to NF4 with `nf4_block_sizes`.

    Raises:
        ValueError: the weight's element count is not a multiple of 64.
    """
    sizes = nf4_block_sizes(weight.numel())
    if sizes is None:
        raise ValueError(f"cannot quantise a weight of shape {tuple(weight.shape)} to NF4: numel must be a multiple of 64")
    return to_nf4(weight.contiguous(), block_size=sizes[0], scaler_block_size=sizes[1])


# --------------------------------------------------------------------------------------- the NF4 matmul
#
# torchao's linear_nf4 saves the NF4 weight and dequantises it again in backward (for the input's gradient). Under
# torch.compile, AOTAutograd traces forward and backward into one graph, merges the two identical
# dequantisations and, partitioning it, saves the forward's dense bf16 copy for backward instead: every frozen
# weight of the compiled layers, in bf16, held from forward to backward (5.6 GB for a 3B model). nf4_linear's
# backward dequantises through a custom op that the compiler cannot see into, so it cannot be merged with the
# forward's (traced, fusible) dequantisation and the only tensors kept for backward are the 4-bit ones.


@torch.library.custom_op("mft::nf4_dequantize", mutates_args=())
def _nf4_dequantize(quantized_data: torch.Tensor, quantized_scalers: torch.Tensor, quantization_factor: torch.Tensor,
                    scaler_mean: torch.Tensor, nf4: torch.Tensor, rows: int, cols: int, block_size: int,
                    n_blocks: int, scaler_block_size: int, weight_dtype: torch.dtype,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """torchao's dequantisation (``NF4Tensor.get_original_weight``) of an NF4 weight given as its parts."""
    meta = SubclassTensorArgs(torch.Size([rows, cols]), (cols, 1), 0, weight_dtype, quantized_data.device, False)
    weight = NF4Tensor(meta, block_size, n_blocks, scaler_block_size, quantized_scalers, quantization_factor,
                       scaler_mean, quantized_data, nf4)
    return weight.get_original_weight().to(out_dtype)


@_nf4_dequantize.register_fake
def _(quantized_data, quantized_scalers, quantization_factor, scaler_mean, nf4, rows, cols, block_size, n_blocks,
      scaler_block_size, weight_dtype, out_dtype):
    return quantized_data.new_empty((rows, cols), dtype=out_dtype)


def nf4_dequantize_opaque(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` dequantised to ``dtype`` by ``mft::nf4_dequantize``: one op to the compiler, recomputed where it
    is called instead of shared with another dequantisation of the same weight."""
    rows, cols = weight.shape
    return _nf4_dequantize(weight.quantized_data, weight.quantized_scalers, weight.quantization_factor,
                           weight.scaler_mean, weight.nf4, rows, cols, weight.block_size, weight.n_blocks,
                           weight.scaler_block_size, weight.dtype, dtype)


class _NF4Linear(torch.autograd.Function):
    """``x @ W^T`` for a frozen NF4 ``W``: forward dequantises as torchao does (traced and fused by the compiler),
    backward dequantises again through the opaque op; only the NF4 weight is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad_output @ nf4_dequantize_opaque(weight, grad_output.dtype), None


def nf4_linear(x: torch.Tensor, weight: NF4Tensor) -> torch.Tensor:
    """``x @ W^T`` with a frozen NF4 weight; keeps the 4-bit weight, not a dense copy, for backward."""
    return _NF4Linear.apply(x, weight)


class LoRALinear(nn.Module):
    """`y = x W^T + b + scale * lora_b(lora_a(dropout(x)))` with W (and b) frozen.

    Args:
        in_dim: input features.
        out_dim: output features.
        rank: LoRA rank r.
        alpha: LoRA alpha; scale = alpha / r (or alpha / sqrt(r) with rsLoRA).
        dropout: dropout on the adapter's input (the base path never sees it).
        use_rslora: use rank-stabilised scaling alpha / sqrt(r).
        bias: whether the base layer has a (frozen) bias.
        quantize_base: store W as a torchao NF4Tensor (QLoRA).
        dtype: dtype of the base weight and the adapter.
        device: device of the parameters ("meta" to build without memory).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = False,
        quantize_base: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.in_features = in_dim  # nn.Linear's attribute names: some HF modules read them
        self.out_features = out_dim
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.quantize_base = quantize_base
        factory = {"dtype": dtype, "device": device}
        weight = torch.empty(out_dim, in_dim, **factory)
        if quantize_base:
            weight = quantize_nf4(weight)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_dim, **factory), requires_grad=False) if bias else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_dim, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, out_dim, bias=False, **factory)
        if torch.device(device or "cpu").type != "meta":
            self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, quantize_base: bool = False) -> "LoRALinear":
        """A LoRALinear with `linear`'s shape, dtype and device (weights are not copied: load them after)."""
        return cls(
            linear.in_features, linear.out_features, rank, alpha, dropout=dropout, use_rslora=use_rslora,
            bias=linear.bias is not None, quantize_base=quantize_base, dtype=linear.weight.dtype,
            device=linear.weight.device,
        )

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """lora_a Kaiming-uniform (as nn.Linear), lora_b zeros: the adapter starts as the identity update."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone: x W^T + b."""
        if isinstance(self.weight, NF4Tensor):
            out = nf4_linear(x, self.weight)
        else:
            out = F.linear(x, self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out

    # False inside ``adapters_disabled``: the layer computes its base alone (a preference run's reference model).
    adapter_enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if not self.adapter_enabled:
            return out
        return out + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        base = "nf4" if self.quantize_base else "plain"
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, "
                f"scaling={self.scaling:.4g}, base={base}, bias={self.bias is not None}")

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale * B @ A in the adapter's dtype (NF4 bases are dequantised first)."""
        dtype = self.lora_a.weight.dtype
        weight = self.weight.to(dtype) if isinstance(self.weight, NF4Tensor) else self.weight.detach().to(dtype)
        return weight + self.scaling * (self.lora_b.weight @ self.lora_a.weight)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every ``LoRALinear`` of ``model`` computes its frozen base alone inside: the base model, without a second
    copy of its weights (the reference model of preference tuning, as TRL's ``disable_adapter``)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_enabled = True


def _is_adapter_name(name: str) -> bool:
    return ".lora_a." in f".{name}" or ".lora_b." in f".{name}"


def adapter_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA adapter weight (`lora_a.weight`, `lora_b.weight`) in `model`."""
    for name, param in model.named_parameters():
        if _is_adapter_name(name):
            yield name, param


def set_trainable_params(model: nn.Module, trainable: str = "lora") -> None:
    """Freeze everything except the LoRA adapters (trainable="lora") or train everything ("all").

    Raises:
        ValueError: unknown `trainable`.
    """
    if trainable not in ("lora", "all"):
        raise ValueError(f"trainable must be 'lora' or 'all', got {trainable!r}")
    for name, param in model.named_parameters():
        if isinstance(param, NF4Tensor):
            param.requires_grad_(False)  # a 4-bit base never trains
        else:
            param.requires_grad_(trainable == "all" or _is_adapter_name(name))


def get_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `model`, keyed by their module path in `model` (full tensors if not sharded)."""
    return {name: param.detach() for name, param in adapter_params(model)}


def adapter_to_peft_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename adapter keys to PEFT's: `<path>.lora_a.weight` -> `base_model.model.<path>.lora_A.weight`.

    `<path>` is the module path inside the transformers causal LM (an `MFTModel`'s `hf_model.` prefix and
    FSDP / activation-checkpoint wrapper names are dropped). Non-adapter keys are ignored. Adapters of expert /
    router parameters (``<owner>.lora.<param>.lora_a.weight``) take peft's ``target_parameters`` layout
    (``expert_lora.param_adapters_to_peft``).
    """
    out = {}
    params = {}
    for key, value in state_dict.items():
        if not _is_adapter_name(key):
            continue
        key = hf_key(key)
        if ".lora." in key:
            params[key] = value
            continue
        key = key.replace(".lora_a.weight", ".lora_A.weight").replace(".lora_b.weight", ".lora_B.weight")
        out[f"base_model.model.{key}"] = value
    out.update(param_adapters_to_peft(params))
    return out


def peft_to_adapter_state_dict(state_dict: dict[str, torch.Tensor], target_parameters=None,
                               rank: int | None = None) -> dict[str, torch.Tensor]:
    """Inverse of `adapter_to_peft_state_dict`: PEFT keys -> keys of the transformers model (no `hf_model.`).
    ``target_parameters`` and ``rank`` (the adapter config's) are needed when it adapts expert / router
    parameters."""
    state_dict = {k.removeprefix("base_model.model.").replace(".default.weight", ".weight"): v
                  for k, v in state_dict.items()}
    out = {}
    if target_parameters:
        state_dict, out = peft_to_param_adapters(state_dict, target_parameters, rank)
    for key, value in state_dict.items():
        key = key.replace(".lora_A.weight", ".lora_a.weight").replace(".lora_B.weight", ".lora_b.weight")
        out[key] = value
    return out


def hf_key(key: str) -> str:
    """An MFTModel parameter name -> the transformers model's key (drops ``hf_model.`` and the names FSDP2,
    activation checkpointing and torch.compile wrappers insert)."""
    key = key.removeprefix("hf_model.")
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        key = key.replace(wrapper, "")
    return key


def lora_target_names(model: nn.Module) -> list[str]:
    """Sorted leaf names (e.g. `q_proj`) of the LoRALinear modules in `model`: PEFT's `target_modules`."""
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, LoRALinear)})


def peft_adapter_config(
    base_model_dir: str | Path,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    use_rslora: bool = False,
    target_parameters: list[str] | None = None,
) -> dict:
    """The `adapter_config.json` content that `peft.PeftModel.from_pretrained` needs for our adapter.

    Args:
        base_model_dir: the base model directory (recorded as `base_model_name_or_path`).
        rank, alpha, dropout, use_rslora: the LoRA hyper-parameters used in training.
        target_modules: module leaf names carrying adapters (see `lora_target_names`).
        target_parameters: adapted expert / router parameters (``expert_lora.lora_target_parameters``). peft
            refuses them with a dropout, which no weight-space update has; the config then says 0 (it changes
            nothing at inference).

    Returns:
        dict: JSON-serialisable PEFT LoraConfig fields.
    """
    extra = {"target_parameters": sorted(target_parameters), "lora_dropout": 0.0} if target_parameters else {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_dir),
        "r": int(rank),
        "lora_alpha": alpha,
        "lora_dropout": float(dropout),
        "target_modules": sorted(target_modules),
        "use_rslora": bool(use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    } | extra


@torch.no_grad()
def merge_lora_weights(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` (in place) by an `nn.Linear` holding W + scale * B @ A.

    NF4 bases are dequantised to the adapter's dtype first; frozen NF4Linear layers become plain nn.Linear
    with the dequantised weight. Works on unsharded models only.

    Returns:
        nn.Module: `model`, now free of LoRALinear modules (its state dict has the base model's keys).
    """
    fold_param_adapters(model)  # MoE experts / routers (expert_lora)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            weight = module.merged_weight()
        elif isinstance(module, NF4Linear):
            weight = module.weight.get_original_weight()
        else:
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.to(weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, linear)
    return model


def merge_lora_state_dict(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Merged weights from a base state dict and an adapter state dict keyed like `get_adapter_state_dict`.

    For every `<path>.lora_a.weight` / `<path>.lora_b.weight` pair, `base["<path>.weight"]` becomes
    W + scaling * B @ A (computed in float32, cast back to W's dtype). Other tensors are passed through.

    Raises:
        KeyError: an adapter has no matching base weight.
    """
    merged = dict(base)
    for key, a in adapter.items():
        if not key.endswith(".lora_a.weight"):
            continue
        path = hf_key(key[: -len(".lora_a.weight")])
        b = adapter[key[: -len(".lora_a.weight")] + ".lora_b.weight"]
        if f"{path}.weight" not in base:
            raise KeyError(f"adapter {key} has no base weight {path}.weight")
        w = base[f"{path}.weight"]
        merged[f"{path}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return merged


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is NF4 (QLoRA's non-adapted decoder linears). Keys: weight, bias."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_dim
        self.out_features = out_dim
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(quantize_nf4(torch.empty(out_dim, in_dim, **factory)), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_dim, **factory), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NF4Linear":
        """An NF4Linear with `linear`'s shape, dtype and device (weights are not copied: load them after)."""
        return cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   dtype=linear.weight.dtype, device=linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nf4_linear(x, self.weight)
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, base=nf4"
