"""Deprecated name of ``mft_components.assets`` (the demo's model and data, cached), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.assets.cache import cache_root
from mft_components.assets.dataframebench import (
    DATAFRAMEBENCH_FORMAT,
    DATAFRAMEBENCH_TASKS,
    DATAFRAMEBENCH_VERSION,
    DEMO_PROMPT,
    dataframebench_conversations,
    dataframebench_package,
    prepare_dataframebench,
)
from mft_components.assets.smollm2 import SMOLLM2_PACKAGE, find_smollm2_gguf, prepare_smollm2

__all__ = ["DATAFRAMEBENCH_FORMAT", "DATAFRAMEBENCH_TASKS", "DATAFRAMEBENCH_VERSION", "DEMO_PROMPT", "SMOLLM2_PACKAGE",
           "cache_root", "dataframebench_conversations", "dataframebench_package", "find_smollm2_gguf",
           "prepare_dataframebench", "prepare_smollm2"]

warnings.warn("mft_components.demo_assets moved to mft_components.assets (cache, smollm2, dataframebench); "
              "import from there", DeprecationWarning, stacklevel=2)
