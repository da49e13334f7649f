"""Models: any Hugging Face causal LM, with LoRA / NF4, packed attention and FSDP2, returning per-token losses.

    lora.py              LoRALinear (frozen base, plain or NF4) and NF4Linear, PEFT key names
    packed_attention.py  mft's own packed-sequence attentions (per-sample SDPA, varlen_attn) and boundaries
    attention.py         BACKENDS, the one table of attentions, and the `auto` choice per device
    moe.py               the router's load-balancing loss, the expert count
    expert_lora.py       LoRA on fused MoE experts and routers (ParamLoRA), NF4 experts, peft target_parameters
    liger.py             liger-kernel's RMSNorm / SwiGLU / RoPE kernels (CUDA)
    model.py             MFTModel (decoder + chunked cross entropy in one forward), prepare_batch
    parallelize.py       activation checkpointing, per-layer compile, FSDP2 sharding, gather_state_dict
    weights.py           safetensors weights streamed into the (sharded) parameters
    build.py             build_model (the `model:` builder), DEFAULT_LORA_TARGETS, load_tokenizer

It sits above loss/ (the forward computes the loss). The names of the flat ``models.py`` are all here.
"""

from mft_components.models.lora import LoRALinear, LoRAOptions, NF4Linear
from mft_components.models.attention import BACKENDS, known_attn_implementations, resolve_attn_implementation
from mft_components.models.moe import num_experts, router_aux_loss
from mft_components.models.liger import (
    LIGER_KERNELS,
    apply_liger_kernels,
    liger_kernel_names,
    liger_options,
    resolve_liger,
)
from mft_components.models.model import ATTENTION_INPUTS, MFTModel, decoder_layers, prepare_batch
from mft_components.models.weights import load_weights, safetensors_files
from mft_components.models.build import (
    DEFAULT_LORA_TARGETS,
    apply_lora,
    build_meta_model,
    build_model,
    load_tokenizer,
    param_bytes,
    resolve_lora_config,
)

__all__ = ["LoRALinear", "LoRAOptions", "NF4Linear", "BACKENDS", "known_attn_implementations",
           "resolve_attn_implementation", "num_experts", "router_aux_loss", "LIGER_KERNELS", "apply_liger_kernels",
           "liger_kernel_names", "liger_options", "resolve_liger", "ATTENTION_INPUTS", "MFTModel", "decoder_layers",
           "prepare_batch", "load_weights", "safetensors_files", "DEFAULT_LORA_TARGETS", "apply_lora",
           "build_meta_model", "build_model", "load_tokenizer", "param_bytes", "resolve_lora_config"]
