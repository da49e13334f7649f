"""Model builders: any Hugging Face causal LM from a local directory, for full, LoRA or QLoRA fine-tuning.

    config.json ──> transformers architecture, parameters on the meta device (no memory)
                ──> target nn.Linear -> LoRALinear (QLoRA: every decoder-layer linear's weight in NF4)
                ──> FSDP2 sharding (distributed: per decoder layer, then the root), still on meta
                ──> weights streamed from the safetensors shards, one tensor at a time, straight into
                    each rank's shard (NF4 quantised as they arrive)

Peak host memory while loading is the final model plus about one tensor (safetensors files are memory
mapped), never two copies of the model. `MFTModel.forward(batch)` runs the decoder and the chunked
cross-entropy against `lm_head` inside one forward, so FSDP2's root unshards `lm_head` for the loss and no
[B, T, V] float32 logits are ever built.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import re
from pathlib import Path
from typing import Callable, Literal

import torch
from safetensors import safe_open
from torch import nn

from mft_components import distributed as dist_utils
from mft_components.attention import (  # importing it registers mft's attention functions
    BACKENDS,
    attention_kwargs,
    gpu_too_old,
    resolve_attn_implementation,
)
from mft_components.lora import (
    LoRALinear,
    LoRAOptions,
    NF4Linear,
    nf4_block_sizes,
    set_trainable_params,
)
from mft_components.loss import (
    LOSS_INDEX,
    check_label_range,
    chunked_cross_entropy,
    loss_token_index,
    router_aux_loss,
)

log = logging.getLogger(__name__)

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


class MFTModel(nn.Module):
    """A transformers causal LM plus the loss: `forward(batch) -> (token_losses, aux_loss)`.

    Attributes:
        hf_model: the transformers `*ForCausalLM` (LoRA / NF4 modules inside; FSDP2-sharded when distributed).
        method: "full", "lora" or "qlora".
        lora_config: dict(rank, alpha, dropout, target_modules, use_rslora) or None for full fine-tuning.
        model_dir: the directory the weights came from.
    """

    def __init__(self, hf_model: nn.Module, method: str, lora_config: dict | None, model_dir: str | Path):
        super().__init__()
        self.hf_model = hf_model
        self.method = method
        self.lora_config = lora_config
        self.model_dir = str(model_dir)
        self.attn_implementation = getattr(hf_model.config, "_attn_implementation", None)
        self.compile_scope = "off"  # build_model records what it compiled (distributed.COMPILE_SCOPES)
        self.compile_watch = None  # and whether it ran compiled (distributed.CompileWatch, reported after a step)

    @property
    def config(self):
        return self.hf_model.config

    def decoder(self) -> nn.Module:
        """The decoder stack without the LM head (`LlamaModel`, `GPTNeoXModel`, ...)."""
        return self.hf_model.base_model

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers (the unit of FSDP2 sharding and activation checkpointing)."""
        return decoder_layers(self.hf_model)

    def forward(self, batch: dict, chunk_size: int = 1024, projection_dtype: str = "model",
                cross_entropy: str = "chunked") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token losses of the batch's loss-carrying tokens, and the MoE load-balancing loss.

        Args:
            batch: collator output (input_ids, labels already shifted, position_ids, optional attention_mask,
                sample_ids); tensors on the model's device. A batch from `prepare_batch` also carries the
                attention's inputs and the loss tokens' positions, computed on the host.
            chunk_size: tokens projected onto the vocabulary at once by the chunked cross-entropy.
            projection_dtype: ``model`` or ``float32``, the dtype of that projection (see `chunked_cross_entropy`).
            cross_entropy: ``chunked`` or ``liger`` (``loss.cross_entropy``).

        Returns:
            (token_losses float32 [N] for labels != -100 in row-major order, aux_loss scalar or None).
        """
        config = self.hf_model.config
        moe = _num_experts(config) is not None
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids"), "use_cache": False}
        if batch.get("attention_mask") is not None:
            kwargs["attention_mask"] = batch["attention_mask"]
        if moe:
            kwargs["output_router_logits"] = True
        # the attention's per-micro-batch inputs (segments, BlockMask, cu_seqlens): prepared, or computed here
        attention = batch.get(ATTENTION_INPUTS)
        kwargs.update(attention if attention is not None else attention_kwargs(batch, config))
        out = self.decoder()(**kwargs)
        hidden = out.last_hidden_state
        hidden = hidden * _logit_multiplier(config) if _logit_multiplier(config) != 1.0 else hidden
        weight = self.hf_model.get_output_embeddings().weight
        token_losses = chunked_cross_entropy(
            hidden, weight, batch["labels"], chunk_size, softcap=getattr(config, "final_logit_softcapping", None),
            projection_dtype=projection_dtype, loss_index=batch.get(LOSS_INDEX), kernel=cross_entropy,
        )
        aux = None
        router_logits = getattr(out, "router_logits", None) if moe else None
        if router_logits:
            sample_ids = batch.get("sample_ids")
            mask = None if sample_ids is None else sample_ids >= 0
            aux = router_aux_loss(router_logits, _num_experts(config), config.num_experts_per_tok, mask)
        return token_losses, aux


    def generate(self, *args, **kwargs):
        """transformers' ``generate`` on the decoder and its LM head, called through this root module so that under
        FSDP2 (which registers it as a forward method) the root's parameters (embeddings, final norm, ``lm_head``)
        are gathered first, as for ``forward``."""
        return self.hf_model.generate(*args, **kwargs)


# Batch key of the attention's inputs computed by `prepare_batch` (a dict of decoder keyword arguments).
ATTENTION_INPUTS = "attention_inputs"


def prepare_batch(batch: dict, device: torch.device, config) -> dict:
    """A collated micro-batch on ``device``, with what the forward would otherwise read back from the device.

    The tensors are copied with ``non_blocking=True`` (asynchronous from the pinned memory the loader uses on
    CUDA). Before they leave the host, the loss tokens' positions (``LOSS_INDEX``) and the attention backend's
    boundaries (segment lengths, cu_seqlens) are computed from the host copy, and the labels are range-checked:
    on a GPU, the forward then never waits for the device, so the host queues the next kernels while the
    device computes. A flex_attention BlockMask is built on the device right after the copy.

    Args:
        batch: collator output on the host (``input_ids``, ``labels``, ``position_ids``, ``sample_ids``,
            ``task_ids``).
        device: the model's device.
        config: the transformers config of the model (``_attn_implementation``, ``vocab_size``).

    Returns:
        The batch's tensors on ``device`` plus ``LOSS_INDEX`` and ``ATTENTION_INPUTS``.

    Raises:
        ValueError: a label outside the vocabulary, or what the attention backend rejects.
    """
    index = loss_token_index(batch["labels"])
    check_label_range(batch["labels"].reshape(-1)[index], config.vocab_size)
    moved = {k: dist_utils.to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    moved[LOSS_INDEX] = dist_utils.to_device(index, device)
    moved[ATTENTION_INPUTS] = attention_kwargs(moved, config, host_batch=batch)
    return moved


def _num_experts(config) -> int | None:
    for name in ("num_experts", "num_local_experts"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def _logit_multiplier(config) -> float:
    """Architectures that scale logits (Cohere's logit_scale, Granite's logits_scaling) scale the hidden state."""
    if getattr(config, "logit_scale", None):
        return float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        return 1.0 / float(config.logits_scaling)
    return 1.0


def decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a transformers causal LM.

    Raises:
        ValueError: no `layers` / `h` / `blocks` ModuleList on the base model.
    """
    base = hf_model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(hf_model).__name__}: cannot find the decoder layers (expected base_model.layers / .h)")


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
    linears become frozen NF4Linear). Works on the meta device.

    Returns:
        list[str]: qualified names of the LoRALinear modules.

    Raises:
        ValueError: no linear matched `lora["target_modules"]`.
    """
    targets = lora["target_modules"]
    layers = decoder_layers(hf_model)
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
    if not swapped:
        raise ValueError(
            f"model.lora.target_modules: {targets!r} matched no nn.Linear in the decoder layers of "
            f"{type(hf_model).__name__}; linear names there: {sorted(_linear_names(layers))}"
        )
    return swapped


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
            or ``selective`` (only cheap ops recomputed); `distributed.ACTIVATION_CHECKPOINTING`.
        compile: ``auto`` (CUDA: whole decoder layers when the attention has static shapes, else norms and MLP;
            CPU: off), true (the same scope on any device) or false; `distributed.resolve_compile`.
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
    checkpointing = dist_utils.activation_checkpointing_mode(activation_checkpointing)
    liger_kernels = resolve_liger(liger, device)
    if cpu_offload and not distributed:  # FSDP2's offload policy: without sharding it would be silently ignored
        raise ValueError("model.cpu_offload: FSDP2 offloads the shards of a run on 2 or more ranks; this run has one, "
                         "where it would do nothing; set it to false (on one GPU, method: qlora and "
                         "activation_checkpointing save memory)")
    hf_model, lora_cfg = build_meta_model(model_dir, method, lora, dtype, attn, trust_remote_code)
    scope, compile_why = dist_utils.resolve_compile(compile, device, BACKENDS[attn].static_shapes,
                                                    moe=_num_experts(hf_model.config) is not None)
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
    if dist_utils.get_rank() == 0:
        print(f"[mft] attention: {attn_why}\n[mft] compile: {compile_why}", flush=True)

    # Names and owners of every parameter, taken before any wrapping so loading never depends on wrapper names.
    param_owners = _parameter_owners(hf_model)
    if distributed:
        dist_utils.shard_model(
            model, param_dtype=torch_dtype, cpu_offload=cpu_offload,
            activation_checkpointing=checkpointing, compile=scope,
        )
    else:
        dist_utils.apply_activation_checkpointing(model, checkpointing)
        if scope != "off":
            dist_utils.compile_layers(model, whole=scope == "layers")
    if scope != "off":  # the compile label is checked against dynamo's counters once a step has run
        model.compile_watch = dist_utils.CompileWatch(model, dist_utils.COMPILE_SCOPES[scope], auto=compile == "auto")
    load_weights(model, param_owners, device, torch_dtype)
    _print_param_counts(model)
    return model


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
    config against the model directory (``recipe_checks.py``).

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
        safetensors_files(model_dir)  # no weights: say so now, not after the data is built
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model.model_dir: {e}") from None
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


LIGER_KERNELS = ("rms_norm", "swiglu", "rope")


def liger_kernel_names(value) -> tuple[str, ...]:
    """``model.liger`` as kernel names, wherever the run is: false -> (), true -> all of ``LIGER_KERNELS``
    (``mft validate`` checks this much; the device and the package are ``resolve_liger``'s).

    Raises:
        ValueError: unknown names.
    """
    if not value:
        return ()
    kernels = LIGER_KERNELS if value is True else tuple([value] if isinstance(value, str) else value)
    unknown = sorted(set(kernels) - set(LIGER_KERNELS))
    if unknown:
        raise ValueError(f"model.liger: unknown kernels {unknown}; expected true or a list of {list(LIGER_KERNELS)}")
    return kernels


def resolve_liger(value, device: torch.device) -> tuple[str, ...]:
    """``model.liger`` as the kernel names to apply on ``device``: false -> (), true -> all of ``LIGER_KERNELS``.

    Raises:
        ValueError: unknown names, a device other than CUDA, or liger-kernel not installed.
    """
    kernels = liger_kernel_names(value)
    if not kernels:
        return ()
    if torch.device(device).type != "cuda":
        raise ValueError(f"model.liger: liger-kernel's Triton kernels run on CUDA only, not {device}; set it to false")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("model.liger: needs the liger-kernel package (pip install 'mft[gpu]'); or set it to false")
    return kernels


def apply_liger_kernels(hf_model: nn.Module, kernels: tuple[str, ...]) -> None:
    """Swap in liger-kernel's Triton RMSNorm / SwiGLU / RoPE for this model instance (its per-family
    ``apply_liger_kernel_to_*``; LoRA linears inside the MLP stay, the fused SiLU x up calls them). Its RoPE patch
    replaces the family's ``apply_rotary_pos_emb`` module-wide, as liger does.

    Raises:
        ValueError: liger-kernel has no kernels for this ``model_type``.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = hf_model.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ValueError(f"model.liger: liger-kernel has no kernels for model_type {model_type!r}; set it to false")
    apply(model=hf_model, **liger_options(apply, kernels, model_type))


# mft's kernel name -> liger's keyword for it; the MLP's gated activation is SwiGLU, or GeGLU in the Gemma family.
_LIGER_KEYWORDS = {"rms_norm": ("rms_norm",), "rope": ("rope",), "swiglu": ("swiglu", "geglu")}


def liger_options(apply: Callable, kernels: tuple[str, ...], model_type: str) -> dict[str, bool]:
    """Keyword arguments of a liger ``apply_liger_kernel_to_*`` function that apply exactly ``kernels``: every
    kernel liger would apply by default (e.g. Gemma's geglu, the fused linear cross entropy) is off unless asked for.

    Raises:
        ValueError: a kernel asked for that liger has not for this ``model_type``.
    """
    accepted = inspect.signature(apply).parameters
    options = {name: False for name, p in accepted.items() if isinstance(p.default, bool)}
    for kernel in kernels:
        keyword = next((k for k in _LIGER_KEYWORDS[kernel] if k in accepted), None)
        if keyword is None:
            raise ValueError(f"model.liger: liger-kernel has no {kernel} kernel for model_type {model_type!r}; "
                             f"list the others ({[k for k in LIGER_KERNELS if k != kernel]}) or set it to false")
        options[keyword] = True
    return options


def _parameter_owners(module: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """{name: [(owning module, attribute), ...]}; tied parameters list all their owners under the first name."""
    by_id: dict[int, str] = {}
    owners: dict[str, list[tuple[nn.Module, str]]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, param in mod._parameters.items():
            if param is None:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            first = by_id.setdefault(id(param), name)
            owners.setdefault(first, []).append((mod, attr))
            if first != name:
                owners[name] = owners[first]  # alias: a checkpoint may hold either name
    return owners


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a HF model directory, from the index when sharded (each file once, index order).

    Raises:
        FileNotFoundError: the directory holds no safetensors weights.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: lists shards that are not in the directory: {missing[:5]}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in model_dir.iterdir())
    raise FileNotFoundError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json (found: {found[:20]}); "
        "convert .bin checkpoints to safetensors first"
    )


class _KeyMapper:
    """Checkpoint key -> model parameter name, using transformers' own conversion table for the architecture
    (renames such as GPT-NeoX's `embed_out` -> `lm_head`, and per-expert MoE weights stacked into the fused
    expert tensors). Expert tensors are gathered until a layer's set is complete, then merged."""

    def __init__(self, hf_model: nn.Module, owners: dict):
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping

            self.transforms = get_model_conversion_mapping(hf_model)
        except Exception as exc:  # older / newer transformers: exact key names only
            log.debug("no transformers conversion mapping: %s", exc)
            self.transforms = []
        self.owners = owners
        self.pending: dict[str, tuple[object, dict[str, dict[int, torch.Tensor]]]] = {}

    def __call__(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key in self.owners:
            return [(key, tensor)]
        for transform in self.transforms:
            new_key, pattern = transform.rename_source_key(key)
            if pattern is None:
                continue
            if not hasattr(transform, "operations") or not transform.operations:
                key = new_key
                continue
            return self._collect(transform, key, new_key, pattern, tensor)
        return [(key, tensor)]

    def _collect(self, transform, key, target, pattern, tensor):
        # The expert index is the last integer in the key: model.layers.L.mlp.experts.E.gate_proj.weight
        numbers = re.findall(r"\.(\d+)\.", key)
        index = int(numbers[-1]) if numbers else 0
        _, groups = self.pending.setdefault(target, (transform, {}))
        groups.setdefault(pattern, {})[index] = tensor
        n_experts = self._expected(target)
        if len(groups) < len(transform.source_patterns) or any(len(g) < n_experts for g in groups.values()):
            return []
        del self.pending[target]
        data = {p: [groups[p][i] for i in range(n_experts)] for p in transform.source_patterns}
        for op in transform.operations:
            data = op.convert(data, source_patterns=transform.source_patterns, target_patterns=transform.target_patterns)
        (merged,) = data.values()
        return [(target, merged)]

    def _expected(self, target: str) -> int:
        mod, attr = self.owners[target][0]
        return mod._parameters[attr].shape[0]


@torch.no_grad()
def load_weights(model: MFTModel, owners: dict, device: torch.device, dtype: torch.dtype) -> None:
    """Stream the safetensors weights of `model.model_dir` into `model`'s (meta, possibly sharded) parameters.

    One checkpoint tensor is materialised at a time: cast to `dtype`, quantised to NF4 where the parameter is
    NF4, cut to this rank's shard where the parameter is a DTensor. LoRA adapters are initialised afterwards.

    Raises:
        ValueError: shape mismatches, unexpected checkpoint keys, or model parameters missing from the checkpoint.
    """
    model_dir = Path(model.model_dir)
    mapper = _KeyMapper(model.hf_model, owners)
    unexpected: list[str] = []
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                for name, tensor in mapper(key, f.get_tensor(key)):
                    if name not in owners:
                        if not name.endswith("rotary_emb.inv_freq"):
                            unexpected.append(f"{file.name}: {name}")
                        continue
                    _assign(owners[name], tensor, device, dtype, f"{file.name}: {key}")
    if unexpected:
        raise ValueError(f"{model_dir}: checkpoint tensors the {type(model.hf_model).__name__} architecture does not "
                         f"have: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    missing = []
    for name, own in owners.items():
        mod, attr = own[0]
        if isinstance(mod, LoRALinear) and attr == "weight" and mod._parameters[attr] is None:
            continue
        param = mod._parameters[attr]
        if ".lora_a." in f".{name}." or ".lora_b." in f".{name}.":
            continue
        if _is_meta(param):
            missing.append(name)
    if missing:
        raise ValueError(f"{model_dir}: checkpoint has no weights for {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} (is it the right model directory?)")
    _init_lora(model, device)
    for mod in model.modules():  # buffers were built for real on CPU (rotary inv_freq etc.)
        for name, buf in mod._buffers.items():
            if buf is not None and buf.device != device:
                mod._buffers[name] = buf.to(device)


def _is_meta(t: torch.Tensor) -> bool:
    local = getattr(t, "_local_tensor", t)
    return local.device.type == "meta"


def _assign(own: list[tuple[nn.Module, str]], full: torch.Tensor, device, dtype, where: str) -> None:
    mod, attr = own[0]
    old = mod._parameters[attr]
    if tuple(old.shape) != tuple(full.shape):
        raise ValueError(f"{where}: checkpoint shape {tuple(full.shape)} != model shape {tuple(old.shape)}")
    # copy=True: never keep a parameter backed by the memory-mapped checkpoint file
    full = full.to(device=device, dtype=dtype if full.is_floating_point() else full.dtype, copy=True)
    new = dist_utils.make_param_like(old, full)
    for m, a in own:
        m._parameters[a] = new
    if full.device.type == "cpu" and new is not None and type(getattr(new, "_local_tensor", new)) is not torch.Tensor:
        del full
        _trim_host_memory()  # NF4 quantisation frees many small transients glibc would otherwise keep


def _trim_host_memory() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim; no-op elsewhere)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _init_lora(model: MFTModel, device) -> None:
    """Materialise LoRA weights: lora_a Kaiming-uniform from the global RNG (same on every rank), lora_b zeros."""
    for mod in model.modules():
        if not isinstance(mod, LoRALinear):
            continue
        for sub in (mod.lora_a, mod.lora_b):
            old = sub.weight
            full = torch.empty(old.shape, dtype=old.dtype, device="cpu")
            if sub is mod.lora_a:
                nn.init.kaiming_uniform_(full, a=5 ** 0.5)
            else:
                nn.init.zeros_(full)
            sub._parameters["weight"] = dist_utils.make_param_like(old, full.to(device))


def _print_param_counts(model: MFTModel) -> None:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dist_utils.get_rank() == 0:
        print(f"[mft] {type(model.hf_model).__name__} ({model.method}): trainable params {trainable:,} / "
              f"total {total:,} ({100.0 * trainable / max(total, 1):.3f}%)", flush=True)


def param_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by parameters, split into NF4 / frozen / trainable (local shards when sharded)."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

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
