"""Deprecated name of ``mft_components.inference.generate`` (``mft generate``), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.inference.generate import (
    GenerateError,
    Generation,
    GenerationModel,
    add_arguments,
    generate,
    load_generation_model,
    merge_adapter_into,
    read_prompt_file,
    run,
    to_messages,
)

__all__ = ["GenerateError", "Generation", "GenerationModel", "add_arguments", "generate", "load_generation_model",
           "merge_adapter_into", "read_prompt_file", "run", "to_messages"]

warnings.warn("mft_components.generate moved to mft_components.inference.generate; import from there",
              DeprecationWarning, stacklevel=2)
