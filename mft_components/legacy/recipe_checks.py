"""Deprecated name of ``mft_components.recipe_config.checks`` (a recipe config's checks against its components),
kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.recipe_config.checks import check_code_eval, check_recipe_config

__all__ = ["check_code_eval", "check_recipe_config"]

warnings.warn("mft_components.recipe_checks moved to mft_components.recipe_config.checks; import from there",
              DeprecationWarning, stacklevel=2)
