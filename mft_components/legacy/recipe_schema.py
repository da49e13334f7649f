"""Deprecated name of ``mft_components.recipe_config.schema`` (the recipes' config keys), kept for old recipes.

Every recipe copied before the layered layout imports it, so it also puts back what old recipes call on surviving
modules (``MFTData.train_loader``, ``mft_components.distributed.gather_state_dict``, ...: ``moved_names``).
"""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.recipe_config.checks import check_code_eval
from mft_components.recipe_config.schema import EvalConfig, FullRecipeConfig, LoRARecipeConfig, RecipeConfig

__all__ = ["EvalConfig", "FullRecipeConfig", "LoRARecipeConfig", "RecipeConfig", "check_code_eval"]

warnings.warn("mft_components.recipe_schema moved to mft_components.recipe_config.schema; import from there",
              DeprecationWarning, stacklevel=2)
