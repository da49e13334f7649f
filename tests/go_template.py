"""A tiny evaluator of Go's ``text/template`` for the subset Ollama Modelfile TEMPLATEs use (tests only).

Supported, with Go's semantics: text, ``{{ pipeline }}`` output, ``{{-`` / ``-}}`` trimming, ``if`` / ``else if`` /
``else`` / ``end``, ``range`` (dot becomes the element; ``$i, $x :=`` forms), ``$v := ...`` and ``$v = ...``
(assignment reaches the variable of the enclosing scope, Go 1.11+), fields ``.A.B`` / ``$.A`` / ``$v.A``, string
literals, parentheses, and the functions ``eq ne and or not len``. Anything else raises ``ValueError``, so a
template outside the subset fails the test instead of rendering wrongly.
"""

from __future__ import annotations

import ast
import re

_ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|:=|=|,|\$?[A-Za-z_.$][\w.$]*)')


def _lex(template: str) -> list[tuple[str, str]]:
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            while pos < len(template) and template[pos].isspace():
                pos += 1
    parts.append(("text", template[pos:]))
    return [p for p in parts if p != ("text", "")]


def _words(action: str) -> list[str]:
    words, pos = [], 0
    while pos < len(action):
        m = _TOKEN.match(action, pos)
        if not m:
            if action[pos:].strip():
                raise ValueError(f"unsupported template syntax at {action[pos:]!r}")
            break
        words.append(m.group(1))
        pos = m.end()
    return words


def _parse(parts, i=0, stop=("end",)):
    """Nodes until an ``end`` / ``else`` (returned with it)."""
    nodes = []
    while i < len(parts):
        kind, s = parts[i]
        if kind == "text":
            nodes.append(("text", s))
            i += 1
            continue
        w = _words(s)
        if w[0] in ("end", "else"):
            return nodes, i, w
        if w[0] in ("if", "range"):
            body, i, closer = _parse(parts, i + 1)
            branches = [(w[1:], body)]
            while closer[0] == "else":
                if w[0] != "if":
                    raise ValueError("range ... else is outside the supported subset")
                cond = closer[2:] if closer[1:2] == ["if"] else None
                body, i, closer = _parse(parts, i + 1)
                branches.append((cond, body))
            nodes.append((w[0], branches))
            i += 1
            continue
        nodes.append(("action", w))
        i += 1
    if stop != ("end",) or i < len(parts):
        raise ValueError("unterminated block")
    return nodes, i, None


def _field(value, path: str):
    for name in filter(None, path.split(".")):
        value = value[name]
    return value


def _lookup(scopes: list[dict], name: str):
    for scope in reversed(scopes):
        if name in scope:
            return scope
    raise ValueError(f"undefined variable {name}")


def _operand(word: str, dot, scopes: list[dict]):
    if word.startswith('"'):
        return ast.literal_eval(word)
    if word == ".":
        return dot
    if word.startswith("."):
        return _field(dot, word)
    if word.startswith("$"):
        name, _, rest = word.partition(".")
        return _field(_lookup(scopes, name)[name], rest)
    raise ValueError(f"unsupported operand {word!r}")


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not a,
    "and": lambda *xs: next((x for x in xs if not x), xs[-1]),
    "or": lambda *xs: next((x for x in xs if x), xs[-1]),
    "len": len,
}


def _eval(words: list[str], dot, scopes: list[dict]):
    """A command: ``func arg...`` or a single operand; arguments may be parenthesised commands."""
    args, i = [], 0
    while i < len(words):
        if words[i] == "(":
            depth, j = 1, i + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(words[j], 0)
                j += 1
            args.append(("value", _eval(words[i + 1:j - 1], dot, scopes)))
            i = j
        else:
            args.append(("word", words[i]))
            i += 1
    if args[0][0] == "word" and args[0][1] in _FUNCS:
        values = [v if k == "value" else _operand(v, dot, scopes) for k, v in args[1:]]
        return _FUNCS[args[0][1]](*values)
    if len(args) != 1:
        raise ValueError(f"unsupported command {' '.join(words)!r}")
    kind, v = args[0]
    return v if kind == "value" else _operand(v, dot, scopes)


def _run(nodes, dot, scopes: list[dict], out: list[str]) -> None:
    """Run ``nodes``; ``scopes`` is the chain of variable scopes, innermost last (a block opens one)."""
    for kind, payload in nodes:
        if kind == "text":
            out.append(payload)
        elif kind == "action":
            w = payload
            if len(w) >= 2 and w[0].startswith("$") and w[1] in (":=", "="):
                value = _eval(w[2:], dot, scopes)
                (scopes[-1] if w[1] == ":=" else _lookup(scopes, w[0]))[w[0]] = value
            else:
                value = _eval(w, dot, scopes)
                out.append(value if isinstance(value, str) else str(value))
        elif kind == "if":
            for cond, body in payload:
                if cond is None or _eval(cond, dot, scopes):
                    _run(body, dot, scopes + [{}], out)
                    break
        elif kind == "range":
            (header, body), = payload
            names = []
            if ":=" in header:
                k = header.index(":=")
                names = [n for n in header[:k] if n != ","]
                header = header[k + 1:]
            for index, element in enumerate(_eval(header, dot, scopes)):
                inner = dict(zip(names, [element] if len(names) == 1 else [index, element]))
                _run(body, element, scopes + [inner], out)


def render(template: str, data: dict) -> str:
    """Render ``template`` with ``data`` as dot (and ``$``)."""
    nodes, _, _ = _parse(_lex(template))
    out: list[str] = []
    _run(nodes, data, [{"$": data}], out)
    return "".join(out)
