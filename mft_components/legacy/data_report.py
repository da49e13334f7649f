"""Deprecated name of ``mft_components.data.report`` (the ``mft data`` command), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.data.report import add_arguments, build_config_data, render_marked, run

__all__ = ["add_arguments", "build_config_data", "render_marked", "run"]

warnings.warn("mft_components.data_report moved to mft_components.data.report; import from there",
              DeprecationWarning, stacklevel=2)
