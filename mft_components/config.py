"""Declarative YAML configs: loading, command-line overrides, `_component_` instantiation and validation.

A config is YAML read by OmegaConf, so `${a.b}` interpolation and `${oc.env:VAR,default}` work. Command-line
overrides follow torchtune::

    model.lora.rank=32          set a value (parsed as YAML: 32 is an int, true a bool, null None, [1,2] a list)
    optimizer.lr=1e-4           a value may itself contain '=' (only the first '=' splits)
    ~loss.task_weights          delete a key

A node with `_component_: dotted.path` is built by :func:`instantiate`; its other keys are keyword arguments,
nested components are built first, and the recipe adds the arguments only it knows at run time::

    optimizer = instantiate(cfg.optimizer, model.parameters())

Validation (:func:`check_config`) compares a config against the recipe's schema, a dataclass declaring the keys
the recipe reads, and each `_component_` node against its target's signature, so a misspelt key is reported with
the file it came from and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, get_args, get_origin

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

COMPONENT_KEY = "_component_"


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but `1e-4` is a float: YAML 1.1 needs a dot (`1.0e-4`), and nobody writes that."""


YamlLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)
# Keyword arguments whose values name files or directories that must exist before a run starts.
PATH_ARGUMENTS = ("model_dir", "tokenizer_dir", "data_paths", "valid_data_paths")


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the config (key, file, what was expected)."""


# --------------------------------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> DictConfig:
    """Read a YAML config and apply command-line overrides.

    Args:
        path: a YAML file, or the name of a built-in config (``demo`` or ``demo.yaml``).
        overrides: ``key=value`` and ``~key`` strings, applied in order.

    Returns:
        The config; :func:`source_of` tells the file it came from.

    Raises:
        ConfigError: the file is missing or is not a YAML mapping, or an override is malformed.
    """
    from mft_components.registry import resolve_config

    file = resolve_config(path)
    try:
        raw = read_yaml(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: a config must be a YAML mapping of keys, got {type(raw).__name__}")
    cfg = OmegaConf.create(raw)
    apply_overrides(cfg, overrides)
    set_source(cfg, file)
    return cfg


def set_source(cfg: DictConfig, file: str | os.PathLike) -> None:
    """Remember which file a config came from, for error messages."""
    object.__setattr__(cfg, "_mft_source", str(file))  # DictConfig's own __setattr__ would make it a key


def source_of(cfg: DictConfig) -> str:
    return getattr(cfg, "_mft_source", "<config>")


def parse_override(text: str) -> tuple[str, Any, bool]:
    """Split one override into (key, value, delete).

    Raises:
        ConfigError: it is neither ``key=value`` nor ``~key``.
    """
    if text.startswith("~"):
        key = text[1:]
        if not key or "=" in key:
            raise ConfigError(f"override {text!r}: deletion is written '~key.path' with no value")
        return key, None, True
    key, sep, value = text.partition("=")
    if not sep or not key or key.startswith("-"):
        raise ConfigError(f"override {text!r}: expected 'key.path=value' or '~key.path'")
    try:
        parsed = read_yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value  # not YAML (e.g. 'a: b: c'): take the text as written
    return key, parsed, False


def apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> None:
    """Apply ``key=value`` / ``~key`` overrides in place (see module docstring)."""
    for text in overrides:
        key, value, delete = parse_override(text)
        if delete:
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            if not isinstance(parent, DictConfig) or leaf not in parent:
                raise ConfigError(f"override '~{key}': there is no key '{key}' to delete")
            del parent[leaf]
            continue
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {text!r}: {e}") from e


def to_container(node: Any) -> Any:
    """Resolve interpolations and return plain Python dicts and lists."""
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot resolve config: {e}") from e
    return node


# ---------------------------------------------------------------------------------------------- instantiation


def import_object(dotted: str) -> Any:
    """Import ``package.module.attr`` (attributes may be nested: ``torch.optim.AdamW``).

    Raises:
        ConfigError: nothing importable has that name.
    """
    if not isinstance(dotted, str) or not dotted:
        raise ConfigError(f"{COMPONENT_KEY} must be a dotted path string, got {dotted!r}")
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and not module_name.startswith(e.name):
                raise  # the module exists but one of its own imports is missing: show the real cause
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ConfigError(f"cannot import {dotted!r}: no such module or attribute")


def instantiate(node: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the object a ``_component_`` node describes.

    Nested components among its arguments are built first (depth first); ``args`` and ``kwargs`` are the
    run-time arguments the recipe supplies and take precedence over the config's.

    Args:
        node: a config node with ``_component_``, or None (returns None).

    Raises:
        ConfigError: no ``_component_``, an import failure, or arguments that do not fit the target.
    """
    if node is None:
        return None
    spec = to_container(node)
    if not isinstance(spec, dict) or COMPONENT_KEY not in spec:
        raise ConfigError(f"cannot instantiate {spec!r}: it has no '{COMPONENT_KEY}' key")
    return _build(spec, args, kwargs)


def _build(spec: dict, args: tuple = (), runtime: dict | None = None) -> Any:
    target = import_object(spec[COMPONENT_KEY])
    config_kwargs = {k: _build_nested(v) for k, v in spec.items() if k != COMPONENT_KEY}
    config_kwargs.update(runtime or {})
    try:
        inspect.signature(target).bind(*args, **config_kwargs)
    except TypeError as e:
        raise ConfigError(f"{spec[COMPONENT_KEY]}: {e}") from e
    except ValueError:
        pass  # builtins without a signature: let the call itself complain
    return target(*args, **config_kwargs)


def _build_nested(value: Any) -> Any:
    if isinstance(value, dict):
        if COMPONENT_KEY in value:
            return _build(value)
        return {k: _build_nested(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_build_nested(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ validation


def check_config(cfg: DictConfig, schema: type | None = None, check_paths: bool = True) -> list[str]:
    """Every problem in a config, as messages that name the file and the key. Empty when the config is fine.

    Checks: keys against the recipe's schema (unknown keys with the closest valid one, missing required keys,
    value types and ``minimum`` bounds), each ``_component_`` importable and its arguments matching the signature
    and its type annotations (nested components too; arguments the recipe supplies at run time are allowed to be
    absent), and that input paths exist. Then the schema's ``semantic_checks``, functions
    ``(config dict, keys already found wrong) -> messages`` for what a schema cannot express (cross-checks
    against the model directory or the data); they skip the top-level keys already reported.
    """
    source = source_of(cfg)
    try:
        data = to_container(cfg)
    except ConfigError as e:
        return [f"{source}: {e}"]
    problems: list[str] = []
    if schema is not None:
        flagged = _check_against_schema(data, schema, "", source, problems)
        for check in getattr(schema, "semantic_checks", ()):
            problems += [f"{source}: {message}" for message in check(data, flagged)]
    else:
        _walk_components(data, "", source, problems, runtime_args={})
    return problems


def _runtime_args(schema_field: dataclasses.Field | None) -> tuple[str, ...]:
    return tuple(schema_field.metadata.get("runtime_args", ())) if schema_field is not None else ()


def _default_component(schema_field: dataclasses.Field) -> str | None:
    """The ``_component_`` of a schema field's default node, if it has one."""
    if schema_field.default_factory is dataclasses.MISSING:
        return None
    default = schema_field.default_factory()
    return default.get(COMPONENT_KEY) if isinstance(default, dict) else None


def _check_against_schema(data: dict, schema: type, prefix: str, source: str, problems: list[str]) -> set[str]:
    """Append the problems of ``data`` against ``schema``; return the keys (of this level) that had one."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    flagged = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        before = len(problems)
        if key not in fields:
            problems.append(f"{source}: unknown key '{path}'{_closest(key, fields, prefix)}")
            continue
        field_type = _dataclass_in(hints[key]) or hints[key]
        is_component = "runtime_args" in fields[key].metadata
        if is_component and isinstance(value, dict) and COMPONENT_KEY not in value:
            default = _default_component(fields[key])
            if default is None:
                problems.append(f"{source}: '{path}' has no '{COMPONENT_KEY}': expected the dotted path of "
                                f"what builds it")
            else:  # `loss.mode=sample` on a config without a loss section: the default builder, as fill_defaults
                data[key] = value = {COMPONENT_KEY: default, **value}
        if dataclasses.is_dataclass(field_type) and isinstance(value, dict):
            _check_against_schema(value, field_type, f"{path}.", source, problems)
        elif dataclasses.is_dataclass(field_type) and not (value is None and _type_error(None, hints[key]) is None):
            # a section of keys (eval, eval.code) given a scalar or a list: the run would fail on its first key
            nullable = " or null" if _type_error(None, hints[key]) is None else ""
            keys = [f.name for f in dataclasses.fields(field_type)]
            problems.append(f"{source}: '{path}' is {value!r}: expected a mapping of its keys "
                            f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}){nullable}")
        elif isinstance(value, dict) and COMPONENT_KEY in value:
            _check_component(value, path, source, problems, _runtime_args(fields[key]))
        elif is_component and not isinstance(value, dict):
            problems.append(f"{source}: '{path}' is {value!r}: expected a mapping with '{COMPONENT_KEY}'")
        else:
            error = _type_error(value, field_type) or _bound_error(value, field_type, fields[key].metadata)
            if error:
                problems.append(f"{source}: '{path}' is {value!r}: expected {error}")
        if len(problems) > before:
            flagged.add(key)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            problems.append(f"{source}: missing required key '{prefix}{name}'")
            flagged.add(name)
    return flagged


def _bound_error(value: Any, annotation: Any, metadata: Any) -> str | None:
    """None when a number respects the field's ``minimum`` (``exclusive``: strictly above it), else what was
    expected, e.g. 'a positive integer or null'. NaN never does."""
    if "minimum" not in metadata or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, exclusive = metadata["minimum"], metadata.get("exclusive", False)
    if (value > low) if exclusive else (value >= low):
        return None
    options = get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    kind = "integer" if int in options else "number"
    if (low == 0 and exclusive) or (kind == "integer" and low == 1 and not exclusive):
        expected = f"a positive {kind}"
    elif low == 0:
        expected = f"a non-negative {kind}"
    else:
        expected = f"{'an' if kind == 'integer' else 'a'} {kind} {'>' if exclusive else '>='} {low}"
    return expected + (" or null" if type(None) in options else "")


def _walk_components(value: Any, path: str, source: str, problems: list[str], runtime_args: dict) -> None:
    if isinstance(value, dict):
        if COMPONENT_KEY in value:
            _check_component(value, path, source, problems, ())
            return
        for k, v in value.items():
            _walk_components(v, f"{path}.{k}" if path else k, source, problems, runtime_args)


def _check_component(spec: dict, path: str, source: str, problems: list[str], runtime_args: Iterable[str]) -> None:
    try:
        target = import_object(spec[COMPONENT_KEY])
    except (ConfigError, ImportError) as e:
        problems.append(f"{source}: '{path}.{COMPONENT_KEY}': {e}")
        return
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    hints = _type_hints(target)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    runtime = set(runtime_args)
    for key, value in spec.items():
        if key == COMPONENT_KEY:
            continue
        if key not in names and not accepts_any:
            problems.append(
                f"{source}: '{path}.{key}' is not an argument of {spec[COMPONENT_KEY]}{_closest(key, names, path + '.')}"
            )
        if isinstance(value, dict) and COMPONENT_KEY in value:
            _check_component(value, f"{path}.{key}", source, problems, ())
        elif isinstance(value, dict) and _typed_dict_in(hints.get(key)) is not None:
            _check_typed_dict(value, _typed_dict_in(hints[key]), f"{path}.{key}", source, problems)
        elif key in hints and _type_error(value, hints[key]):
            problems.append(f"{source}: '{path}.{key}' is {value!r}: expected {_type_error(value, hints[key])}")
        elif key in PATH_ARGUMENTS:
            _check_paths_exist(value, f"{path}.{key}", source, problems)
    # Positional-only / required parameters the recipe passes at run time (e.g. model.parameters()) are skipped:
    # the first required parameter of optimizers and every declared runtime argument.
    required = [
        n for n, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
    ]
    for i, name in enumerate(required):
        if name in spec or name in runtime or (i == 0 and "params" in name):
            continue
        problems.append(f"{source}: '{path}' is missing required argument '{name}' of {spec[COMPONENT_KEY]}")


def _type_hints(target: Any) -> dict:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations only cost us the deeper check
        return {}


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass of a section annotated ``Section`` or ``Section | None`` (its keys are checked)."""
    options = get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return next((o for o in options if dataclasses.is_dataclass(o)), None)


def _typed_dict_in(annotation: Any) -> type | None:
    """The TypedDict of an argument annotated ``Options`` or ``Options | None``: its keys can be checked."""
    options = get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return next((o for o in options if typing.is_typeddict(o)), None)


def _check_typed_dict(value: dict, typed_dict: type, path: str, source: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(typed_dict)
    for key, item in value.items():
        if key not in hints:
            problems.append(f"{source}: unknown key '{path}.{key}'{_closest(key, hints, path + '.')}")
            continue
        error = _type_error(item, hints[key])
        if error:
            problems.append(f"{source}: '{path}.{key}' is {item!r}: expected {error}")


def _check_paths_exist(value: Any, path: str, source: str, problems: list[str]) -> None:
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and not Path(os.path.expanduser(item)).exists():
            problems.append(f"{source}: '{path}': path does not exist: {item}")


def _closest(key: str, valid: Iterable[str], prefix: str) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _type_error(value: Any, annotation: Any) -> str | None:
    """None when ``value`` fits ``annotation``; otherwise a description of what was expected."""
    if annotation is Any:
        return None
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if any(_type_error(value, option) is None for option in options):
            return None
        return " or ".join(_type_error(None, o) or "null" if o is type(None) else _describe(o) for o in options)
    if origin is Literal:
        choices = get_args(annotation)
        if value in choices:
            return None
        return repr(choices[0]) if len(choices) == 1 else "one of " + ", ".join(repr(c) for c in choices)
    if annotation is type(None):
        return None if value is None else "null"
    if origin in (list, tuple) or annotation in (list, tuple):
        return None if isinstance(value, list) else "a list"
    if origin is dict or annotation is dict:
        return None if isinstance(value, dict) else "a mapping"
    if annotation is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    return None


def _describe(annotation: Any) -> str:
    return _type_error(object(), annotation) or getattr(annotation, "__name__", str(annotation))


# ----------------------------------------------------------------------------------------- recipe entry point


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
        elif isinstance(cfg[f.name], DictConfig) and COMPONENT_KEY not in cfg[f.name] and _default_component(f):
            cfg[f.name][COMPONENT_KEY] = _default_component(f)  # a section given in part keeps the default builder


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
