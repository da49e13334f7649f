"""Deprecated name of ``mft_components.interop.mftcoder`` (``mft import mftcoder``), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.interop.mftcoder import (
    Imported,
    add_arguments,
    import_mftcoder,
    read_mftcoder_config,
    report,
    run,
    to_yaml,
    translate,
)
from mft_components.interop.mftcoder_keys import MFTCODER_KEYS, MFTCoderConfigError

__all__ = ["Imported", "add_arguments", "import_mftcoder", "read_mftcoder_config", "report", "run", "to_yaml",
           "translate", "MFTCODER_KEYS", "MFTCoderConfigError"]

warnings.warn("mft_components.mftcoder moved to mft_components.interop.mftcoder; import from there",
              DeprecationWarning, stacklevel=2)
