"""Model builders: any Hugging Face causal LM from a local directory, for full, LoRA or QLoRA fine-tuning.

    config.json ──> transformers architecture, parameters on the meta device (no memory)
                ──> target nn.Linear -> LoRALinear (QLoRA: every decoder-layer linear's weight in NF4)
                ──> FSDP2 sharding (distributed: per decoder layer, then the root), still on meta
                ──> weights streamed from the safetensors shards, one tensor at a time, straight into
                    each rank's shard (NF4 quantised as they arrive)

``build_model`` is the ``model:`` node's builder; ``build_meta_model`` is every decision it takes before it reads a
weight (``mft validate`` checks a config with it); ``DEFAULT_LORA_TARGETS`` is the one table of LoRA targets per
architecture; ``load_tokenizer`` is the ``tokenizer:`` node's builder.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mft_components.device import gpu_too_old
from mft_components.distributed import get_rank
from mft_components.models.attention import BACKENDS, resolve_attn_implementation
from mft_components.models.expert_lora import ParamLoRA, apply_expert_lora, expert_target_names, quantize_experts
from mft_components.models.liger import apply_liger_kernels, resolve_liger
from mft_components.models.lora import (
    LoRALinear,
    LoRAOptions,
    NF4Linear,
    NF4Tensor,
    nf4_block_sizes,
    quantize_nf4,
    set_trainable_params,
)
from mft_components.models.model import MFTModel, decoder_layers
from mft_components.models.moe import num_experts
from mft_components.models.parallelize import (
    COMPILE_SCOPES,
    CompileWatch,
    activation_checkpointing_mode,
    apply_activation_checkpointing,
    compile_layers,
    resolve_compile,
    shard_model,
)
from mft_components.models.weights import load_weights, parameter_owners, safetensors_files, safetensors_problem

__all__ = ["DEFAULT_LORA_TARGETS", "build_model", "build_meta_model", "resolve_lora_config", "apply_lora",
           "load_tokenizer", "param_bytes"]

_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]

# Default LoRA targets per `config.model_type`: the attention and MLP projections, named as in each
# architecture's transformers modules. MoE families: attention plus the dense / shared-expert MLP linears;
# their routed experts are fused 3-D parameters in transformers >= 5 (not nn.Linear), so they stay frozen.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": _ATTN + _MLP,
    "mistral": _ATTN + _MLP,
    "qwen2": _ATTN + _MLP,
    "qwen3": _ATTN + _MLP,
    "gemma": _ATTN + _MLP,
    "gemma2": _ATTN + _MLP,
    "gemma3_text": _ATTN + _MLP,
    "granite": _ATTN + _MLP,
    "olmo2": _ATTN + _MLP,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "starcoder2": _ATTN + ["c_fc", "c_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "qwen2_moe": _ATTN + _MLP,
    "qwen3_moe": _ATTN + _MLP,
    "mixtral": _ATTN,
}

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
_METHODS = ("full", "lora", "qlora")
_LORA_DEFAULTS = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": None, "use_rslora": False}
# The largest LoRA scale (alpha / rank, rsLoRA alpha / sqrt(rank)) accepted: usual ones are 0.25-16; at 1e4 one
# AdamW step already moves the adapted weights by about lr x 1e4, so a larger one only ever diverges.
MAX_LORA_SCALE = 1e4


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """`transformers.AutoTokenizer` from a model (or tokenizer) directory.

    Raises:
        FileNotFoundError: `path` is not a directory.
    """
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def resolve_lora_config(lora: dict | None, model_type: str) -> dict:
    """Fill LoRA defaults; `target_modules` None -> the architecture's default, "all-linear" stays as is.

    Raises:
        ValueError: unknown keys, a non-positive rank, or no default targets for `model_type`.
    """
    lora = dict(lora or {})
    unknown = set(lora) - set(_LORA_DEFAULTS)
    if unknown:
        raise ValueError(f"model.lora: unknown keys {sorted(unknown)}; expected {sorted(_LORA_DEFAULTS)}")
    cfg = {**_LORA_DEFAULTS, **lora}
    if not isinstance(cfg["rank"], int) or isinstance(cfg["rank"], bool) or cfg["rank"] <= 0:
        raise ValueError(f"model.lora.rank: expected a positive integer, got {cfg['rank']!r}")
    if not _is_number(cfg["alpha"]) or not cfg["alpha"] > 0:
        raise ValueError(f"model.lora.alpha: expected a positive number, got {cfg['alpha']!r}")
    scale = cfg["alpha"] / (math.sqrt(cfg["rank"]) if cfg["use_rslora"] else cfg["rank"])
    if not math.isfinite(scale) or scale > MAX_LORA_SCALE:
        raise ValueError(f"model.lora.alpha: {cfg['alpha']!r} gives a LoRA scale alpha / "
                         f"{'sqrt(rank)' if cfg['use_rslora'] else 'rank'} of {scale:.3g}; expected a scale up to "
                         f"{MAX_LORA_SCALE:g} (alpha is usually 1-2x the rank: rank {cfg['rank']}, alpha "
                         f"{2 * cfg['rank']})")
    if not _is_number(cfg["dropout"]) or not 0 <= cfg["dropout"] < 1:
        raise ValueError(f"model.lora.dropout: expected a probability in [0, 1), got {cfg['dropout']!r}")
    targets = cfg["target_modules"]
    if targets is None:
        if model_type not in DEFAULT_LORA_TARGETS:
            raise ValueError(
                f"model.lora.target_modules: no default targets for model_type {model_type!r}; give a list of "
                f"module names (e.g. [q_proj, v_proj]) or 'all-linear'. Known: {sorted(DEFAULT_LORA_TARGETS)}"
            )
        targets = list(DEFAULT_LORA_TARGETS[model_type])
    elif isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    cfg["target_modules"] = targets if targets == "all-linear" else list(targets)
    return cfg


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextlib.contextmanager
def _parameters_on_meta():
    """Register every new nn.Parameter on the meta device; buffers (rotary inv_freq, ...) stay real.

    Buffers are computed by the modules' constructors (small, and their values matter), parameters would cost the
    whole model's memory and are loaded from the checkpoint anyway.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def apply_lora(hf_model: nn.Module, lora: dict, quantize_base: bool) -> list[str]:
    """Swap the target nn.Linears of the decoder layers for LoRALinear (QLoRA: NF4 base; other decoder-layer
    linears become frozen NF4Linear), and give the MoE experts / routers that ``target_modules`` select their
    per-expert adapters (``expert_lora``: ``experts``, ``router`` / ``gate``, MFTCoder's ``w1`` / ``w2`` / ``w3``;
    ``all-linear`` = every linear, the experts and the router). Works on the meta device.

    Returns:
        list[str]: qualified names of the LoRALinear modules and adapted expert / router parameters.

    Raises:
        ValueError: no linear matched `lora["target_modules"]`.
    """
    targets = lora["target_modules"]
    layers = decoder_layers(hf_model)
    _check_rank_fits(layers, targets, lora["rank"])
    moe_names = sorted(set(targets) & set(expert_target_names)) if targets != "all-linear" else []
    if moe_names and num_experts(hf_model.config) is None:
        raise ValueError(f"model.lora.target_modules: {moe_names} name MoE experts / routers, but "
                         f"{type(hf_model).__name__} is not a mixture-of-experts model; remove them")
    swapped = []
    for layer_idx, layer in enumerate(layers):
        for name, module in list(layer.named_modules()):
            if type(module) is not nn.Linear:
                continue
            leaf = name.rsplit(".", 1)[-1]
            is_target = targets == "all-linear" or leaf in targets
            quantize = quantize_base and nf4_block_sizes(module.weight.numel()) is not None
            if is_target:
                new = LoRALinear.from_linear(module, lora["rank"], lora["alpha"], lora["dropout"],
                                             lora["use_rslora"], quantize_base=quantize)
                swapped.append(f"layers.{layer_idx}.{name}")
            elif quantize:
                new = NF4Linear.from_linear(module)
            else:
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, new)
        if targets == "all-linear" or set(targets) & set(expert_target_names):
            swapped += [f"layers.{layer_idx}.{p}" for p in apply_expert_lora(layer, targets, lora)]
        if quantize_base:  # QLoRA: the routed experts (most of a MoE model's weights) in NF4 too
            quantize_experts(layer, quantize_nf4)
    if not swapped:
        raise ValueError(
            f"model.lora.target_modules: {targets!r} matched no nn.Linear"
            + ("" if num_experts(hf_model.config) is None else ", MoE expert or router")
            + f" in the decoder layers of {type(hf_model).__name__}; linear names there: "
            f"{sorted(_linear_names(layers))}"
            + ("" if num_experts(hf_model.config) is None else "; and experts, router (w1, w2, w3, gate)")
        )
    return swapped


def _check_rank_fits(layers: nn.ModuleList, targets, rank: int) -> None:
    """A rank above every adapted layer's min(in, out) adds parameters (a rank of 100,000 runs out of memory) but
    no expressiveness: a layer's update has at most that rank.

    Raises:
        ValueError: naming the rank and the adapted layers' sizes.
    """
    sizes = {(name.rsplit(".", 1)[-1], m.in_features, m.out_features) for name, m in layers[0].named_modules()
             if type(m) is nn.Linear and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets)}
    largest = max((min(i, o) for _, i, o in sizes), default=None)
    if largest is not None and rank > largest:
        shapes = ", ".join(f"{n} {i}->{o}" for n, i, o in sorted(sizes))
        raise ValueError(f"model.lora.rank: {rank} is larger than every layer it adapts ({shapes}): an update of a "
                         f"layer has at most rank min(in, out); expected at most {largest}")


def _linear_names(layers: nn.ModuleList) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)}


def build_model(
    model_dir: str | Path,
    method: str = "lora",
    lora: LoRAOptions | None = None,
    dtype: str = "bf16",
    attn_implementation: str = "auto",
    activation_checkpointing: bool | Literal["full", "every_other", "selective"] = False,
    compile: bool | Literal["auto"] = "auto",
    liger: bool | list[str] = False,
    cpu_offload: bool = False,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    distributed: bool = False,
) -> MFTModel:
    """Build a transformers causal LM from `model_dir` for full, LoRA or QLoRA fine-tuning.

    Args:
        model_dir: a Hugging Face model directory (config.json + model.safetensors or sharded safetensors + index).
        method: "full" (all parameters train), "lora" (adapters on a frozen base), "qlora" (adapters on an NF4 base).
        lora: dict(rank=8, alpha=16, dropout=0.0, target_modules=None|"all-linear"|[names], use_rslora=False).
        dtype: "bf16" or "fp32" for parameters and compute (NF4 weights dequantise to it).
        attn_implementation: ``auto`` (the fastest exact packed attention of the device: flex_attention on CUDA,
            sdpa_varlen on the CPU; `attention.resolve_attn_implementation`), or a name from
            `attention.known_attn_implementations()` (``flex_attention``, ``varlen_attn``, ``sdpa_varlen``,
            ``flash_attention_2``, ``sdpa``, ``eager``, ...). The run prints what it chose.
        activation_checkpointing: false, true / ``full`` (every layer recomputed in backward), ``every_other``
            or ``selective`` (only cheap ops recomputed); `parallelize.ACTIVATION_CHECKPOINTING`.
        compile: ``auto`` (CUDA: whole decoder layers when the attention has static shapes, else norms and MLP;
            CPU: off), true (the same scope on any device) or false; `parallelize.resolve_compile`.
        liger: liger-kernel's RMSNorm, SwiGLU and RoPE kernels (CUDA, ``pip install 'mft[gpu]'``): true for all
            three, or a list of ``rms_norm``, ``swiglu`` (GeGLU in Gemma), ``rope``; only those run. Off by default
            (not yet measured against compile on a GPU). The fused linear cross entropy is ``loss.cross_entropy:
            liger``.
        cpu_offload: FSDP2 CPU offload of parameters, gradients and optimizer state (2 or more ranks; a
            one-rank run refuses it rather than ignore it).
        trust_remote_code: allow custom modelling code shipped with the model.
        device: device for the parameters (runtime; default CPU).
        distributed: shard with FSDP2 over the default process group (runtime).

    Returns:
        MFTModel with weights loaded and only the trainable parameters requiring grad. LoRA weights are
        initialised from torch's global RNG (seed it identically on every rank).

    Raises:
        ValueError: bad method / dtype / LoRA settings. FileNotFoundError: no config.json or safetensors.
    """
    model_dir = Path(model_dir)
    device = torch.device(device or "cpu")
    if device.type == "cuda" and _DTYPES.get(dtype) is torch.bfloat16:  # pre-Ampere GPUs emulate it, or fail
        reason = gpu_too_old("bf16", (8, 0), device)
        if reason is not None:
            raise ValueError(f"dtype: {reason}; set dtype: fp32")
    attn, attn_why = resolve_attn_implementation(attn_implementation, device)
    checkpointing = activation_checkpointing_mode(activation_checkpointing)
    liger_kernels = resolve_liger(liger, device)
    if cpu_offload and not distributed:  # FSDP2's offload policy: without sharding it would be silently ignored
        raise ValueError("model.cpu_offload: FSDP2 offloads the shards of a run on 2 or more ranks; this run has one, "
                         "where it would do nothing; set it to false (on one GPU, method: qlora and "
                         "activation_checkpointing save memory)")
    hf_model, lora_cfg = build_meta_model(model_dir, method, lora, dtype, attn, trust_remote_code)
    scope, compile_why = resolve_compile(compile, device, BACKENDS[attn].static_shapes,
                                                    moe=num_experts(hf_model.config) is not None)
    if compile == "auto" and scope != "off":
        # A default must not end a run: a layer inductor cannot compile on this machine runs eagerly, with
        # dynamo's warning naming the error. `compile: true` keeps such errors fatal.
        torch._dynamo.config.suppress_errors = True
    torch_dtype = _DTYPES[dtype]
    set_trainable_params(hf_model, "all" if method == "full" else "lora")
    if liger_kernels:
        apply_liger_kernels(hf_model, liger_kernels)
    model = MFTModel(hf_model, method, lora_cfg, model_dir)
    model.attn_implementation, model.compile_scope = attn, scope
    if get_rank() == 0:
        print(f"[mft] attention: {attn_why}\n[mft] compile: {compile_why}", flush=True)

    # Names and owners of every parameter, taken before any wrapping so loading never depends on wrapper names.
    param_owners = parameter_owners(hf_model)
    if distributed:
        shard_model(
            model, param_dtype=torch_dtype, cpu_offload=cpu_offload,
            activation_checkpointing=checkpointing, compile=scope,
        )
    else:
        apply_activation_checkpointing(model, checkpointing)
        if scope != "off":
            compile_layers(model, whole=scope == "layers")
    if scope != "off":  # the compile label is checked against dynamo's counters once a step has run
        model.compile_watch = CompileWatch(model, COMPILE_SCOPES[scope], auto=compile == "auto")
    load_weights(model, param_owners, device, torch_dtype)
    _print_param_counts(model)
    if get_rank() == 0 and num_experts(hf_model.config) is not None and method != "full":
        print(f"[mft] MoE: {_moe_adapters(model, lora_cfg)}", flush=True)
    return model


def _moe_adapters(model: MFTModel, lora_cfg: dict) -> str:
    """What the adapters of a MoE model cover: the issue a migrating user meets is experts left frozen unsaid."""
    adapted = sorted({name.rsplit(".lora.", 1)[-1].replace("weight", "router") for name, m in model.named_modules()
                      if isinstance(m, ParamLoRA)})
    if not adapted:
        return ("the routed experts and the router are frozen (add experts, router to model.lora.target_modules, "
                "or use all-linear, to adapt them)")
    dropout = " (they train without dropout)" if lora_cfg.get("dropout") else ""
    return f"LoRA on {', '.join(adapted)} of every MoE layer{dropout}"


def build_meta_model(
    model_dir: str | Path,
    method: str = "lora",
    lora: LoRAOptions | None = None,
    dtype: str = "bf16",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, dict | None]:
    """The architecture of ``model_dir`` on the meta device with its LoRA / NF4 modules in place: every decision
    ``build_model`` takes before it reads a weight, at no memory cost. ``mft validate`` calls it to check a
    config against the model directory (``recipe_config/checks.py``).

    Returns:
        (the transformers causal LM with parameters on meta, the resolved LoRA settings or None for ``full``).

    Raises:
        ValueError: a bad method / dtype / LoRA setting, a ``model_type`` transformers does not know or has no
            causal LM for, ``target_modules`` that match no linear. FileNotFoundError: no config.json, no
            safetensors weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if method not in _METHODS:
        raise ValueError(f"model.method: expected one of {_METHODS}, got {method!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model.model_dir: {model_dir} has no config.json (expected a Hugging Face model directory)")
    try:
        files = safetensors_files(model_dir)  # no weights: say so now, not after the data is built
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model.model_dir: {e}") from None
    for problem in filter(None, map(safetensors_problem, files)):
        raise ValueError(f"model.model_dir: {problem}")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ValueError(f"model.model_dir: {model_dir}/config.json: {_config_problem(model_dir, e)}") from None
    config.use_cache = False
    with _parameters_on_meta():
        try:
            hf_model = AutoModelForCausalLM.from_config(
                config, dtype=_DTYPES[dtype], attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        except ValueError as e:
            raise ValueError(f"model.model_dir: {model_dir}: cannot build a causal LM: {str(e)[:300]}") from None
    lora_cfg = None
    if method != "full":
        lora_cfg = resolve_lora_config(lora, config.model_type)
        apply_lora(hf_model, lora_cfg, quantize_base=method == "qlora")
    return hf_model, lora_cfg


def _config_problem(model_dir: Path, error: ValueError) -> str:
    """What is wrong with a config.json transformers refused: an unknown model_type in a line, else its words."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING_NAMES:
        return (f"model_type {model_type!r} is not an architecture transformers {transformers.__version__} knows "
                "(a newer transformers may know it)")
    return str(error).strip().splitlines()[0]


def _print_param_counts(model: MFTModel) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if get_rank() == 0:
        print(f"[mft] {type(model.hf_model).__name__} ({model.method}): trainable params {trainable:,} / "
              f"total {total:,} ({100.0 * trainable / max(total, 1):.3f}%)", flush=True)


def param_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by parameters, split into NF4 / frozen / trainable (local shards when sharded)."""
    out = {"nf4": 0, "frozen": 0, "trainable": 0}
    for p in model.parameters():
        local = getattr(p, "_local_tensor", p)
        if isinstance(local, NF4Tensor):
            out["nf4"] += sum(getattr(local, a).numel() * getattr(local, a).element_size()
                              for a in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"))
        elif p.requires_grad:
            out["trainable"] += local.numel() * local.element_size()
        else:
            out["frozen"] += local.numel() * local.element_size()
    return out
