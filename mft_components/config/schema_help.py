"""A recipe's config keys as a person reads them (``mft run RECIPE --help``): key, type, default, what it does.

Everything comes from the recipe's ``CONFIG_SCHEMA`` dataclass (its fields, and the ``Attributes:`` section of its
docstring) and, for each ``_component_`` section, from the builder it names (its signature and its ``Args:``
section), so the help cannot drift from what ``mft validate`` checks.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from typing import Any, Iterator, NamedTuple

from mft_components.config.core import COMPONENT_KEY, ConfigError, import_object
from mft_components.config.validate import default_component

__all__ = ["ConfigOption", "config_options", "format_config_options"]


class ConfigOption(NamedTuple):
    key: str  # dotted: data.seq_len
    type: str
    default: str  # "required" when the key must be given
    doc: str


def config_options(schema: type, prefix: str = "") -> Iterator[ConfigOption]:
    """The keys of ``schema`` in declaration order; a section's keys follow it (``eval.code``, ``data.seq_len``)."""
    docs = _schema_docs(schema)
    for f in dataclasses.fields(schema):
        key, doc = prefix + f.name, docs.get(f.name, "")
        section = f.type if isinstance(f.type, type) and dataclasses.is_dataclass(f.type) else None
        section = section or _dataclass_named(f.type, schema)
        if "runtime_args" in f.metadata:  # a `_component_` node: the builder's own arguments follow
            builder_path = default_component(f) or _first_dotted_path(doc)
            shown = f"{COMPONENT_KEY}: {default_component(f)}" if default_component(f) else "required"
            yield ConfigOption(key, "_component_ node", shown, doc)
            yield from _builder_options(builder_path, key, f.metadata["runtime_args"])
        elif section is not None:
            yield ConfigOption(key, "section", "", doc)
            yield from config_options(section, key + ".")
        else:
            yield ConfigOption(key, _type_text(f), _default_text(f), doc)


def format_config_options(schema: type, width: int = 100) -> str:
    """:func:`config_options` as text: a line per key (key, type, default), its documentation indented below."""
    options = list(config_options(schema))
    key_width = min(max(len(o.key) for o in options) + 2, 40)
    lines = []
    for option in options:
        head = f"  {option.key:<{key_width}} {option.type}"
        if option.default:
            head += "  (required)" if option.default == "required" else f"  (default: {option.default})"
        lines.append(head)
        if option.doc:
            lines += textwrap.wrap(option.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the schema


def _schema_docs(schema: type) -> dict[str, str]:
    """``name -> text`` from the ``Attributes:`` sections of the schema and its bases (the subclass's win)."""
    docs: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        docs.update(_docstring_section(cls.__doc__ or "", "Attributes"))
    return docs


def _docstring_section(docstring: str, title: str) -> dict[str, str]:
    """Google-style ``Title:`` entries ``name: text`` (continued on deeper-indented lines; ``a, b: text`` documents
    both); the text joined on one line, reST literals unquoted."""
    entries: dict[str, list[str]] = {}
    lines = inspect.cleandoc(docstring).splitlines()
    inside, entry_indent, names = False, None, []
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not inside:
            inside = stripped == f"{title}:"
            continue
        if stripped and indent == 0:
            break  # the next section
        if not stripped:
            continue
        entry_indent = indent if entry_indent is None else entry_indent
        match = re.match(r"([\w, *]+?):\s*(.*)$", stripped) if indent == entry_indent else None
        if match:
            names = [n.strip().lstrip("*") for n in match.group(1).split(",")]
            for name in names:
                entries[name] = [match.group(2)]
        else:
            for name in names:
                entries[name].append(stripped)
    return {name: re.sub(r":\w+:`([^`]*)`|``([^`]*)``", lambda m: m.group(1) or m.group(2), " ".join(text))
            for name, text in entries.items()}


def _dataclass_named(annotation: Any, schema: type) -> type | None:
    """The dataclass a string annotation (``from __future__ import annotations``) names, from the schema's module."""
    if not isinstance(annotation, str):
        return None
    module = inspect.getmodule(schema)
    candidate = getattr(module, annotation.split("|")[0].strip(), None)
    return candidate if isinstance(candidate, type) and dataclasses.is_dataclass(candidate) else None


def _type_text(f: dataclasses.Field) -> str:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    text = text.replace("typing.", "")
    if "minimum" in f.metadata:
        text += f" ({'>' if f.metadata.get('exclusive') else '>='} {f.metadata['minimum']})"
    return text


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else _yaml_scalar(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def _yaml_scalar(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# ------------------------------------------------------------------------------------------------ builders


def _first_dotted_path(doc: str) -> str | None:
    match = re.search(r"\b(mft_components(?:\.\w+)+)\b", doc)
    return match.group(1) if match else None


def _builder_options(path: str | None, prefix: str, runtime_args: tuple[str, ...]) -> Iterator[ConfigOption]:
    """The keyword arguments a builder takes from the config (not those the recipe passes at run time)."""
    if path is None:
        return
    try:
        builder = import_object(path)
        signature = inspect.signature(builder)
    except (ConfigError, ImportError, TypeError, ValueError):
        return
    target = builder.__init__ if inspect.isclass(builder) else builder
    docs = _docstring_section(inspect.getdoc(builder) or "", "Args")
    docs.update(_docstring_section(inspect.getdoc(target) or "", "Args") if target is not builder else {})
    for name, p in signature.parameters.items():
        if name in runtime_args or name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = p.annotation if p.annotation is not p.empty else ""
        type_text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
        default = "required" if p.default is p.empty else ("null" if p.default is None else _yaml_scalar(p.default))
        yield ConfigOption(f"{prefix}.{name}", type_text.replace("typing.", ""), default, docs.get(name, ""))
