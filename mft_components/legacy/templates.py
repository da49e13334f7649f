"""Deprecated name of ``mft_components.data.templates`` (ChatFormat), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.data.templates import (
    ATORCH_ROLE_MARKERS,
    DEFAULT_ROLE_MARKERS,
    ROLES,
    TEMPLATES,
    ChatFormat,
    encode_segments,
    encode_texts,
)

__all__ = ["ATORCH_ROLE_MARKERS", "DEFAULT_ROLE_MARKERS", "ROLES", "TEMPLATES", "ChatFormat", "encode_segments",
           "encode_texts"]

warnings.warn("mft_components.templates moved to mft_components.data.templates; import from there",
              DeprecationWarning, stacklevel=2)
