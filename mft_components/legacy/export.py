"""Deprecated name of ``mft_components.inference.export`` (``mft export``), ``inference.adapters`` and
``inference.shards``, kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.inference.adapters import ExportError, LoRAAdapter, lora_scale, merge_lora_tensor, read_adapter
from mft_components.inference.export import (
    CHAT_FORMAT_FILE,
    add_arguments,
    export_adapter,
    export_checkpoint,
    model_card,
    read_validated_meta,
    remote_code_refused,
    remove_export_leftovers,
    run,
)
from mft_components.inference.shards import OUTPUT_DTYPES, parse_size, write_sharded_weights
from mft_components.models.weights import safetensors_files

__all__ = ["ExportError", "LoRAAdapter", "lora_scale", "merge_lora_tensor", "read_adapter", "CHAT_FORMAT_FILE",
           "add_arguments", "export_adapter", "export_checkpoint", "model_card", "read_validated_meta",
           "remote_code_refused", "remove_export_leftovers", "run", "OUTPUT_DTYPES", "parse_size",
           "write_sharded_weights", "safetensors_files"]

warnings.warn("mft_components.export moved to mft_components.inference.export (with inference.adapters and "
              "inference.shards); import from there", DeprecationWarning, stacklevel=2)
