"""Deprecated name of ``mft_components.models.lora`` (LoRALinear, NF4, PEFT key names), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.models.lora import (
    NF4_BLOCK_SIZE,
    NF4_SCALER_BLOCK_SIZE,
    LoRALinear,
    LoRAOptions,
    NF4Linear,
    NF4Tensor,
    adapter_params,
    adapter_to_peft_state_dict,
    get_adapter_state_dict,
    hf_key,
    lora_target_names,
    merge_lora_state_dict,
    merge_lora_weights,
    nf4_block_sizes,
    peft_adapter_config,
    peft_to_adapter_state_dict,
    quantize_nf4,
    set_trainable_params,
    to_nf4,
)

__all__ = ["NF4_BLOCK_SIZE", "NF4_SCALER_BLOCK_SIZE", "LoRALinear", "LoRAOptions", "NF4Linear", "NF4Tensor",
           "adapter_params", "adapter_to_peft_state_dict", "get_adapter_state_dict", "hf_key", "lora_target_names",
           "merge_lora_state_dict", "merge_lora_weights", "nf4_block_sizes", "peft_adapter_config",
           "peft_to_adapter_state_dict", "quantize_nf4", "set_trainable_params", "to_nf4"]

warnings.warn("mft_components.lora moved to mft_components.models.lora; import from there", DeprecationWarning,
              stacklevel=2)
