"""Config core: YAML reading, command-line overrides and `_component_` instantiation.

A config is YAML read by OmegaConf, so `${a.b}` interpolation and `${oc.env:VAR,default}` work. Command-line
overrides follow torchtune::

    model.lora.rank=32          set a value (parsed as YAML: 32 is an int, true a bool, null None, [1,2] a list)
    optimizer.lr=1e-4           a value may itself contain '=' (only the first '=' splits)
    ~loss.task_weights          delete a key

A node with `_component_: dotted.path` is built by :func:`instantiate`; its other keys are keyword arguments,
nested components are built first, and the recipe adds the arguments only it knows at run time::

    optimizer = instantiate(cfg.optimizer, model.parameters())
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["COMPONENT_KEY", "ConfigError", "ConfigSource", "YamlLoader", "read_yaml", "set_source", "source_of",
           "origin_of", "parse_override",
           "apply_overrides", "to_container", "import_object", "instantiate"]

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


# Values a config may hold once its aliases (*name) are expanded: a real config has a few hundred; a 10-level
# "billion laughs" anchor bomb has 10**10 and would hang OmegaConf, which copies every alias.
MAX_EXPANDED_VALUES = 1_000_000


def read_yaml(text: str, source: str = "the YAML text"):
    """Parse YAML with ``YamlLoader``, refusing a document whose aliases expand past ``MAX_EXPANDED_VALUES``.

    Raises:
        yaml.YAMLError: not valid YAML. ConfigError: too large once expanded, naming ``source``.
    """
    value = yaml.load(text, Loader=YamlLoader)
    size = _expanded_size(value)
    if size > MAX_EXPANDED_VALUES:
        raise ConfigError(f"{source}: its aliases (*name) expand to more than {MAX_EXPANDED_VALUES:,} values "
                          f"(anchors referring to anchors multiply); refused, a config needs far fewer")
    return value


def _expanded_size(root: Any) -> int:
    """How many values ``root`` holds with every shared (aliased) list or mapping counted at each place it is
    used: computed once per distinct object, bottom-up, without recursion (nesting may be deep)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list)) or id(node) in sizes:
            continue
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if children_done:
            total = 1 + sum(sizes.get(id(c), 1) if isinstance(c, (dict, list)) else 1 for c in children)
            sizes[id(node)] = min(total, MAX_EXPANDED_VALUES + 1)  # capped: a bomb's count never grows huge
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if isinstance(c, (dict, list)))
    return sizes.get(id(root), 1)


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the config (key, file, what was expected)."""


# ------------------------------------------------------------------------------------------- reading, overrides


class ConfigSource:
    """Where a config's values came from: its file, and the command-line overrides applied on top of it.

    Error messages name the override a value came from (``data.seq_len=abc (command line)``), not the file,
    which never held it."""

    def __init__(self, file: str | os.PathLike, overrides: Iterable[str] = ()):
        self.file = str(file)
        self.overrides: dict[str, str] = {}  # key -> the override text that last set or deleted it
        for text in overrides:
            key = text[1:] if text.startswith("~") else text.partition("=")[0]
            self.overrides.pop(key, None)  # the last one wins, and is checked first (dicts keep order)
            self.overrides[key] = text

    def at(self, key: str) -> str:
        """The override that set ``key`` or a section above it; for a section, the file and the overrides of keys
        inside it (``cfg.yaml + optimizer.betas=[0.9,1.5] (command line)``); else the file."""
        for set_key, text in reversed(self.overrides.items()):
            if key == set_key or key.startswith(set_key + "."):
                return f"{text} (command line)"
        inside = [text for set_key, text in self.overrides.items() if key and set_key.startswith(key + ".")]
        return f"{self.file} + {' '.join(inside)} (command line)" if inside else self.file

    def __str__(self) -> str:
        return self.file


def set_source(cfg: DictConfig, file: str | os.PathLike, overrides: Iterable[str] = ()) -> None:
    """Remember which file (and overrides) a config came from, for error messages."""
    # DictConfig's own __setattr__ would make it a key
    object.__setattr__(cfg, "_mft_source", ConfigSource(file, overrides))


def source_of(cfg: DictConfig) -> str:
    """The file a config came from."""
    return str(origin_of(cfg))


def origin_of(cfg: DictConfig) -> ConfigSource:
    """Where a config's values came from: ``origin_of(cfg).at("data.seq_len")`` names the file or the override."""
    return getattr(cfg, "_mft_source", None) or ConfigSource("<config>")


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
        parsed = read_yaml(value, f"override {key}") if value.strip() else ""
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
