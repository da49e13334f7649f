"""The built-in recipes and configs, found by name after a normal or an editable install.

Recipes are the files of the package ``mft_recipes`` (the repo's ``recipes/``), configs the YAML files of
``mft_configs`` (the repo's ``configs/``). A name that is not built in is taken as a file path, so a recipe or
config copied with ``mft cp`` and edited runs the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mft_components.config.core import ConfigError

# Which built-in configs belong to which recipe: the one table `mft ls` and `mft validate` read.
RECIPE_CONFIGS: dict[str, tuple[str, ...]] = {
    "lora_finetune_distributed": (
        "demo",
        "qwen_lora",
        "qwen_qlora",
        "llama_lora",
        "llama_qlora",
        "mistral_lora",
        "starcoder2_lora",
        "deepseek_coder_lora",
        "mixtral_qlora",
    ),
    "full_finetune_distributed": ("qwen_full",),
    "preference_finetune_distributed": ("qwen_dpo", "demo_dpo"),
}


@dataclass(frozen=True)
class BuiltIn:
    name: str
    path: Path


def recipes_dir() -> Path:
    return Path(str(resources.files("mft_recipes")))


def configs_dir() -> Path:
    return Path(str(resources.files("mft_configs")))


def builtin_recipe(name: str) -> BuiltIn | None:
    stem = name[:-3] if name.endswith(".py") else name
    path = recipes_dir() / f"{stem}.py"
    return BuiltIn(stem, path) if stem in RECIPE_CONFIGS and path.is_file() else None


def builtin_config(name: str) -> BuiltIn | None:
    stem = name[:-5] if name.endswith(".yaml") else name
    path = configs_dir() / f"{stem}.yaml"
    return BuiltIn(stem, path) if "/" not in stem and path.is_file() else None


def recipe_of_config(name: str) -> str | None:
    """The recipe a built-in config (or a copy that kept its file name) belongs to."""
    stem = Path(name).stem
    return next((recipe for recipe, configs in RECIPE_CONFIGS.items() if stem in configs), None)


def _file_or_builtin(name: str | os.PathLike, builtin: BuiltIn | None) -> Path | None:
    path = Path(os.path.expanduser(str(name)))
    if path.is_file():
        return path  # a file wins over a built-in of the same name: `mft cp` copies keep working
    return builtin.path if builtin else None


def resolve_recipe(name: str | os.PathLike) -> Path:
    """A built-in recipe name or a path to a recipe file -> the file.

    Raises:
        FileNotFoundError: neither exists; the message lists the built-in recipes.
    """
    found = _file_or_builtin(name, builtin_recipe(str(name)))
    if found is None:
        raise FileNotFoundError(f"no recipe {str(name)!r}: not a file, and the built-in recipes are {', '.join(RECIPE_CONFIGS)}")
    return found


def resolve_config(name: str | os.PathLike) -> Path:
    """A built-in config name or a path to a YAML file -> the file.

    Raises:
        ConfigError: neither exists; the message lists the built-in configs.
    """
    found = _file_or_builtin(name, builtin_config(str(name)))
    if found is None:
        known = sorted(c for configs in RECIPE_CONFIGS.values() for c in configs)
        raise ConfigError(f"no config {str(name)!r}: not a file, and the built-in configs are {', '.join(known)}")
    return found
