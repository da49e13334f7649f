"""Loading a recipe's config: a file or a built-in name, overrides, validation, defaults (the ``@parse`` entry).

``load_config`` reads a YAML file (or a built-in config, ``registry.py``) and applies overrides; ``parse`` is the
decorator of a recipe's ``recipe_main(cfg)`` that reads ``--config FILE [key=value ...]``, validates the config
against the recipe's schema (``validate.py``) and fills the schema's defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from omegaconf import DictConfig, OmegaConf

from mft_components.config.core import COMPONENT_KEY, ConfigError, apply_overrides, read_yaml, set_source
from mft_components.config.registry import resolve_config
from mft_components.config.validate import check_config, default_component

__all__ = ["load_config", "parse", "fill_defaults", "split_config_args"]


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> DictConfig:
    """Read a YAML config and apply command-line overrides.

    Args:
        path: a YAML file, or the name of a built-in config (``demo`` or ``demo.yaml``).
        overrides: ``key=value`` and ``~key`` strings, applied in order.

    Returns:
        The config; :func:`source_of` tells the file it came from.

    Raises:
        ConfigError: the file is missing, is not a YAML mapping, or its aliases expand past a bound (an anchor
            bomb), or an override is malformed.
    """
    file = resolve_config(path)
    try:
        raw = read_yaml(file.read_text(encoding="utf-8"), str(file))
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: a config must be a YAML mapping of keys, got {type(raw).__name__}")
    cfg = OmegaConf.create(raw)
    overrides = list(overrides)
    apply_overrides(cfg, overrides)
    set_source(cfg, file, overrides)
    return cfg


def parse(recipe_main: Callable | None = None, *, schema: type | None = None) -> Callable:
    """Decorator for a recipe's ``recipe_main(cfg)``: reads ``--config FILE [key=value ...]`` from sys.argv.

    The config is validated against ``schema`` (the recipe's declared keys) before the recipe runs; every problem
    is printed at once and the process exits with status 1.

    Usage::

        @parse(schema=LoRARecipeConfig)
        def recipe_main(cfg: DictConfig) -> None: ...
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(argv: list[str] | None = None) -> Any:
            argv = sys.argv[1:] if argv is None else argv
            config_path, overrides = split_config_args(argv, prog=Path(sys.argv[0]).name)
            try:
                cfg = load_config(config_path, overrides)
            except ConfigError as e:
                sys.exit(f"config error: {e}")
            problems = check_config(cfg, schema)
            if problems:
                sys.exit("config errors:\n  " + "\n  ".join(problems))
            if schema is not None:
                fill_defaults(cfg, schema)
            return fn(cfg)

        return wrapper

    return decorate(recipe_main) if recipe_main is not None else decorate


def fill_defaults(cfg: DictConfig, schema: type) -> None:
    """Add the schema's default for every key the config leaves out, so the recipe can read ``cfg.key``."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name not in cfg:
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue
            cfg[f.name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(cfg[f.name], DictConfig):
            fill_defaults(cfg[f.name], hints[f.name])
        elif isinstance(cfg[f.name], DictConfig) and COMPONENT_KEY not in cfg[f.name] and default_component(f):
            cfg[f.name][COMPONENT_KEY] = default_component(f)  # a section given in part keeps the default builder


def split_config_args(argv: list[str], prog: str = "recipe") -> tuple[str, list[str]]:
    """``['--config', 'x.yaml', 'a=1']`` -> ``('x.yaml', ['a=1'])``; exits with usage on anything else."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            config_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("-") and not arg.startswith("~"):
            sys.exit(f"usage: {prog} --config FILE [key=value | ~key ...]\nunknown option {arg!r}")
        else:
            overrides.append(arg)
        i += 1
    if config_path is None:
        sys.exit(f"usage: {prog} --config FILE [key=value | ~key ...]\n--config is required")
    return config_path, overrides
