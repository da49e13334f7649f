"""Validation of a config against a recipe's schema and each `_component_`'s signature (``check_config``).

The schema is a dataclass declaring the keys the recipe reads; each `_component_` node is compared with its
target's signature and type annotations, so a misspelt key is reported with the file it came from and the closest
valid key. What a schema cannot express is left to its ``semantic_checks`` (``recipe_config/checks.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, get_args, get_origin

from omegaconf import DictConfig

from mft_components.config.core import COMPONENT_KEY, ConfigError, ConfigSource, import_object, origin_of, to_container

__all__ = ["PATH_ARGUMENTS", "check_config", "default_component"]

# Keyword arguments whose values name files or directories that must exist before a run starts.
PATH_ARGUMENTS = ("model_dir", "tokenizer_dir", "data_paths", "valid_data_paths")


def check_config(cfg: DictConfig, schema: type | None = None, check_paths: bool = True) -> list[str]:
    """Every problem in a config, as messages that name the file and the key. Empty when the config is fine.

    Checks: keys against the recipe's schema (unknown keys with the closest valid one, missing required keys,
    value types and ``minimum`` bounds), each ``_component_`` importable and its arguments matching the signature
    and its type annotations (nested components too; arguments the recipe supplies at run time are allowed to be
    absent), and that input paths exist. Then the schema's ``semantic_checks``, functions
    ``(config dict, keys already found wrong) -> messages`` for what a schema cannot express (cross-checks
    against the model directory or the data); they skip the top-level keys already reported.
    """
    source = origin_of(cfg)
    try:
        data = to_container(cfg)
    except ConfigError as e:
        return [f"{source}: {e}"]
    problems: list[str] = []
    if schema is not None:
        flagged = _check_against_schema(data, schema, "", source, problems)
        for check in getattr(schema, "semantic_checks", ()):
            problems += [f"{source.at(_key_named(message))}: {message}" for message in check(data, flagged)]
    else:
        _walk_components(data, "", source, problems, runtime_args={})
    return problems


def _runtime_args(schema_field: dataclasses.Field | None) -> tuple[str, ...]:
    return tuple(schema_field.metadata.get("runtime_args", ())) if schema_field is not None else ()


def default_component(schema_field: dataclasses.Field) -> str | None:
    """The ``_component_`` of a schema field's default node, if it has one."""
    if schema_field.default_factory is dataclasses.MISSING:
        return None
    default = schema_field.default_factory()
    return default.get(COMPONENT_KEY) if isinstance(default, dict) else None


def _check_against_schema(data: dict, schema: type, prefix: str, source: ConfigSource,
                          problems: list[str]) -> set[str]:
    """Append the problems of ``data`` against ``schema``; return the keys (of this level) that had one."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    flagged = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        before = len(problems)
        if key not in fields:
            problems.append(f"{source.at(path)}: unknown key '{path}'{_closest(key, fields, prefix)}")
            continue
        field_type = _dataclass_in(hints[key]) or hints[key]
        is_component = "runtime_args" in fields[key].metadata
        if is_component and isinstance(value, dict) and COMPONENT_KEY not in value:
            default = default_component(fields[key])
            if default is None:
                problems.append(f"{source.at(path)}: '{path}' has no '{COMPONENT_KEY}': expected the dotted path of "
                                f"what builds it")
            else:  # `loss.mode=sample` on a config without a loss section: the default builder, as fill_defaults
                data[key] = value = {COMPONENT_KEY: default, **value}
        if dataclasses.is_dataclass(field_type) and isinstance(value, dict):
            _check_against_schema(value, field_type, f"{path}.", source, problems)
        elif dataclasses.is_dataclass(field_type) and not (value is None and _type_error(None, hints[key]) is None):
            # a section of keys (eval, eval.code) given a scalar or a list: the run would fail on its first key
            nullable = " or null" if _type_error(None, hints[key]) is None else ""
            keys = [f.name for f in dataclasses.fields(field_type)]
            problems.append(f"{source.at(path)}: '{path}' is {value!r}: expected a mapping of its keys "
                            f"({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}){nullable}")
        elif isinstance(value, dict) and COMPONENT_KEY in value:
            _check_component(value, path, source, problems, _runtime_args(fields[key]))
        elif is_component and not isinstance(value, dict):
            problems.append(f"{source.at(path)}: '{path}' is {value!r}: expected a mapping with '{COMPONENT_KEY}'")
        else:
            error = _type_error(value, field_type) or _bound_error(value, field_type, fields[key].metadata)
            if error:
                problems.append(f"{source.at(path)}: '{path}' is {value!r}: expected {error}")
        if len(problems) > before:
            flagged.add(key)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            problems.append(f"{source.at(prefix + name)}: missing required key '{prefix}{name}'")
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


def _walk_components(value: Any, path: str, source: ConfigSource, problems: list[str], runtime_args: dict) -> None:
    if isinstance(value, dict):
        if COMPONENT_KEY in value:
            _check_component(value, path, source, problems, ())
            return
        for k, v in value.items():
            _walk_components(v, f"{path}.{k}" if path else k, source, problems, runtime_args)


def _check_component(spec: dict, path: str, source: ConfigSource, problems: list[str],
                     runtime_args: Iterable[str]) -> None:
    try:
        target = import_object(spec[COMPONENT_KEY])
    except (ConfigError, ImportError) as e:
        problems.append(f"{source.at(path + '.' + COMPONENT_KEY)}: '{path}.{COMPONENT_KEY}': {e}")
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
                f"{source.at(path + '.' + key)}: '{path}.{key}' is not an argument of {spec[COMPONENT_KEY]}"
                f"{_closest(key, names, path + '.')}"
            )
        if isinstance(value, dict) and COMPONENT_KEY in value:
            _check_component(value, f"{path}.{key}", source, problems, ())
        elif isinstance(value, dict) and _typed_dict_in(hints.get(key)) is not None:
            _check_typed_dict(value, _typed_dict_in(hints[key]), f"{path}.{key}", source, problems)
        elif key in hints and _type_error(value, hints[key]):
            problems.append(f"{source.at(path + '.' + key)}: '{path}.{key}' is {value!r}: "
                            f"expected {_type_error(value, hints[key])}")
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
        problems.append(f"{source.at(path + '.' + name)}: '{path}' is missing required argument '{name}' of "
                        f"{spec[COMPONENT_KEY]}")


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


def _check_typed_dict(value: dict, typed_dict: type, path: str, source: ConfigSource, problems: list[str]) -> None:
    hints = typing.get_type_hints(typed_dict)
    for key, item in value.items():
        if key not in hints:
            problems.append(f"{source.at(path + '.' + key)}: unknown key '{path}.{key}'"
                            f"{_closest(key, hints, path + '.')}")
            continue
        error = _type_error(item, hints[key])
        if error:
            problems.append(f"{source.at(path + '.' + key)}: '{path}.{key}' is {item!r}: expected {error}")


def _check_paths_exist(value: Any, path: str, source: ConfigSource, problems: list[str]) -> None:
    for item in value if isinstance(value, list) else [value]:
        item = item.get("path") if isinstance(item, dict) else item  # a data_paths entry {path: ..., columns: ...}
        if isinstance(item, str) and not Path(os.path.expanduser(item)).exists():
            problems.append(f"{source.at(path)}: '{path}': path does not exist: {item}")


def _key_named(message: str) -> str:
    """The key a semantic check's message starts with (``'optimizer.lr' is ...``, ``loss.mode: ...``), or ''."""
    match = re.match(r"'?([\w.]+)'?[: ]", message)
    return match.group(1) if match else ""


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
