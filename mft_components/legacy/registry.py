"""Deprecated name of ``mft_components.config.registry`` (the built-in recipes and configs), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.config.registry import (
    RECIPE_CONFIGS,
    BuiltIn,
    builtin_config,
    builtin_recipe,
    configs_dir,
    recipe_of_config,
    recipes_dir,
    resolve_config,
    resolve_recipe,
)

__all__ = ["RECIPE_CONFIGS", "BuiltIn", "builtin_config", "builtin_recipe", "configs_dir", "recipe_of_config",
           "recipes_dir", "resolve_config", "resolve_recipe"]

warnings.warn("mft_components.registry moved to mft_components.config.registry; import from there",
              DeprecationWarning, stacklevel=2)
