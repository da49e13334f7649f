"""Deprecated name of ``mft_components.config.registry`` (the built-in recipes and configs), kept for old recipes."""

import warnings

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
