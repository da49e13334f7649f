"""Deprecated name of ``mft_components.data.packing`` (samples -> rows -> the batch dict), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.data.packing import (
    IGNORE_INDEX,
    PACKING_MODES,
    PAD_MULTIPLE,
    check_packing,
    collate,
    pack_lengths,
    pack_samples,
    packing_efficiency,
)

__all__ = ["IGNORE_INDEX", "PACKING_MODES", "PAD_MULTIPLE", "check_packing", "collate", "pack_lengths", "pack_samples",
           "packing_efficiency"]

warnings.warn("mft_components.packing moved to mft_components.data.packing; import from there", DeprecationWarning,
              stacklevel=2)
