"""One line of a task file -> a validated conversation, or a bad record named ``field: problem``.

One JSON object per line; blank lines, CRLF line ends and a UTF-8 BOM are fine. Accepted record shapes:

* ``{"chat_rounds": [{"role": ..., "content": ...}, ...]}`` with roles ``system`` (first only), ``human``/``user``
  and ``bot``/``assistant``/``gpt``, user and assistant alternating, at least one assistant turn; the same in
  OpenAI's shape ``{"messages": [{"role": ..., "content": ...}, ...]}`` and ShareGPT's ``{"conversations":
  [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``; with these two, a top-level ``system``
  (LLaMA-Factory's ShareGPT) is the system turn when the conversation has none;
* single turn (MFTCoder's shapes): ``prompt``/``answer``, ``prompt``/``response``, ``instruction``/``output`` (an
  Alpaca ``input`` is appended to the instruction), ``instruction``/``response``, ``question``/``response``,
  ``question``/``answer``, ``query``/``answer``, ``input``/``output``, each with an optional ``system`` (an empty
  one adds no system turn); a prompt key without its answer key is a bad record (nothing to learn);
* ``{"text": ...}``: plain text, every token carries loss.

Other keys (``id``, ``data_name``, ...) are ignored. Assistant content must not be empty (nothing to learn);
system and user content may be. A bad record, including a line that is not JSON, nests deeper than the JSON
decoder reads, or holds a lone surrogate, raises ``BadRecord(field, problem)``; the data build reports them as
``path:line: field: problem`` lines of a ``DataError`` (``build.py``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["DataError", "BadRecord", "USER_ROLES", "ASSISTANT_ROLES", "CONVERSATION_SHAPES", "SINGLE_TURN_SHAPES",
           "decode_record", "parse_record", "parse_prompt_rounds"]

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("bot", "assistant", "gpt")
CONVERSATION_SHAPES = (  # (list key, role key, content key): mft/MFTCoder's, OpenAI's, ShareGPT's
    ("chat_rounds", "role", "content"),
    ("messages", "role", "content"),
    ("conversations", "from", "value"),
)
SINGLE_TURN_SHAPES = (  # (prompt key, answer key), tried in this order; MFTCoder's shapes, Alpaca's first
    ("prompt", "answer"),
    ("prompt", "response"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("question", "response"),
    ("question", "answer"),
    ("query", "answer"),
    ("input", "output"),
)


class DataError(ValueError):
    """Bad training data, worded for the person who owns it: ``path:line: field: problem`` lines."""


class BadRecord(Exception):
    """One bad record: the ``field`` that is wrong (``chat_rounds[1].role``, ``json``, ...) and the ``problem``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


class _LongInteger:
    """A JSON integer with more digits than Python converts (``sys.get_int_max_str_digits()``, 4300).

    Such a number is valid JSON: in a key mft ignores (``id``) the record is fine; anywhere mft reads it is
    reported by that field's type check instead of failing the whole line."""

    __slots__ = ("digits",)

    def __init__(self, digits: str) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<{len(self.digits.lstrip('-'))}-digit integer>"


def _parse_int(digits: str) -> int | _LongInteger:
    try:
        return int(digits)
    except ValueError:
        return _LongInteger(digits)


# One decoder for every line (json.loads with options would build one per call).
_JSON = json.JSONDecoder(parse_int=_parse_int)


def decode_record(line: bytes) -> Any:
    """The JSON value of one line of a task file.

    Raises:
        BadRecord: the line is not UTF-8, not JSON (with the column), or nests deeper than the decoder reads.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("line", f"invalid UTF-8 at byte {e.start}") from None
    try:
        return _JSON.decode(text)
    except json.JSONDecodeError as e:
        raise BadRecord("json", _json_problem(e)) from None
    except RecursionError:  # the C decoder recurses once per nesting level
        raise BadRecord("json", f"nested too deeply (Python's JSON decoder stops at about "
                                f"{sys.getrecursionlimit()} levels of arrays/objects)") from None


def _json_problem(e: json.JSONDecodeError) -> str:
    msg = e.msg.removesuffix(" at")  # some of json's messages end in "at", meant to be followed by a position
    if msg.startswith("Invalid control character"):
        msg += f" {e.doc[e.pos]!r}"
        hint = " (control characters such as NUL must be escaped inside strings: \\u0000)"
    else:
        hint = ""
    return f"invalid JSON: {msg} at column {e.colno}{hint}"


def _kind(value: Any) -> str:
    """The type of a JSON value, for messages."""
    return "int" if isinstance(value, _LongInteger) else type(value).__name__


def _check_text(value: Any, where: str) -> str:
    """``value`` if it is a string the tokenizer can take, else ``_Bad``: not a string, or a lone surrogate
    (JSON allows ``"\\ud800"`` unpaired; it is not Unicode text, and tokenizers reject it)."""
    if not isinstance(value, str):
        raise BadRecord(where, f"expected a string, got {_kind(value)}")
    if not value.isascii():  # O(1) for ASCII strings; only other text pays for the encode
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRecord(where, f"lone surrogate {value[e.start]!r} at character {e.start}: not valid Unicode text "
                              "(a \\ud800-\\udfff escape must be half of a high/low pair)") from None
    return value


def _string(record: dict, key: str, where: str | None = None) -> str:
    return _check_text(record[key], where or key)


def _check_answer(content: str, where: str) -> None:
    """Empty assistant content teaches only "stop at once": almost always a data bug, so it is a bad record.
    (Empty system or user content is fine: the assistant turn after it still has something to learn.)"""
    if not content.strip():
        raise BadRecord(where, "empty assistant content (nothing to learn); give the answer or drop the record")


def parse_record(record: Any) -> tuple[str, Any]:
    """Validate one JSON record and normalise it.

    Args:
        record: the decoded JSON value of one line.

    Returns:
        ``("chat", messages)`` with roles ``system``/``user``/``assistant``, or ``("text", text)``.

    Raises:
        BadRecord: with the offending field and what is wrong (``DataError`` lines are made from it).
    """
    if not isinstance(record, dict):
        raise BadRecord("record", f"expected a JSON object, got {_kind(record)}")
    for list_key, role_key, content_key in CONVERSATION_SHAPES:
        if list_key in record:
            messages = _parse_chat_rounds(record[list_key], shape=(list_key, role_key, content_key))
            # chat_rounds records keep ignoring a top-level system, as they always did
            if (list_key != "chat_rounds" and messages[0]["role"] != "system" and record.get("system") is not None
                    and _string(record, "system")):
                messages.insert(0, {"role": "system", "content": record["system"]})
            return "chat", messages
    for prompt_key, answer_key in SINGLE_TURN_SHAPES:
        if prompt_key in record and answer_key in record:
            prompt = _string(record, prompt_key)
            if prompt_key == "instruction" and "input" in record:
                extra = _string(record, "input")
                if extra.strip():
                    prompt = f"{prompt}\n\n{extra}"
            messages = []
            # An empty system is no system turn, as in MFTCoder's tokenisation.
            if record.get("system") is not None and _string(record, "system"):
                messages.append({"role": "system", "content": record["system"]})
            messages.append({"role": "user", "content": prompt})
            answer = _string(record, answer_key)
            _check_answer(answer, answer_key)
            messages.append({"role": "assistant", "content": answer})
            return "chat", messages
    if "text" in record:
        text = _string(record, "text")
        if not text:
            raise BadRecord("text", "is empty")
        return "text", text
    shapes = ", ".join(f"{p}/{a}" for p, a in SINGLE_TURN_SHAPES)
    prompts = [k for k in dict.fromkeys(p for p, _ in SINGLE_TURN_SHAPES) if k in record]
    if prompts:  # a prompt without an answer: nothing to learn
        answers = "/".join(a for p, a in SINGLE_TURN_SHAPES if p == prompts[0])
        raise BadRecord("record", f"no known shape: {prompts[0]!r} has no {answers} to learn (keys: {sorted(record)[:8]})")
    raise BadRecord("record", f"no known shape; expected chat_rounds, messages, conversations, {shapes} or text "
                              f"(keys: {sorted(record)[:8]})")


def _parse_chat_rounds(rounds: Any, prompt_only: bool = False,
                       shape: tuple[str, str, str] = CONVERSATION_SHAPES[0]) -> list[dict]:
    list_key, role_key, content_key = shape
    if not isinstance(rounds, list):
        raise BadRecord(list_key, f"expected a list of turns, got {_kind(rounds)}")
    if not rounds:
        raise BadRecord(list_key, "is empty")
    messages = []
    for i, turn in enumerate(rounds):
        where = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(where, f"expected an object with {role_key} and {content_key}, got {_kind(turn)}")
        if role_key not in turn:
            raise BadRecord(f"{where}.{role_key}", "missing")
        role = turn[role_key]
        role_name = role.lower() if isinstance(role, str) else role
        if role_name == "system":
            if i != 0:
                raise BadRecord(f"{where}.{role_key}", "'system' is only allowed as the first turn")
            norm = "system"
        elif role_name in USER_ROLES:
            norm = "user"
        elif role_name in ASSISTANT_ROLES:
            norm = "assistant"
        else:
            raise BadRecord(f"{where}.{role_key}",
                            f"unknown role {role!r}; expected system, human/user or bot/assistant/gpt")
        if content_key not in turn:
            raise BadRecord(f"{where}.{content_key}", "missing")
        content = _check_text(turn[content_key], f"{where}.{content_key}")
        if norm == "assistant":
            _check_answer(content, f"{where}.{content_key}")
        if norm != "system":
            prev = messages[-1]["role"] if messages and messages[-1]["role"] != "system" else None
            expected = "assistant" if prev == "user" else "user"
            if norm != expected:
                raise BadRecord(f"{where}.{role_key}",
                                f"{role!r} follows {'the start' if prev is None else repr(prev)}; "
                                f"user and assistant turns must alternate, starting with user")
        messages.append({"role": norm, "content": content})
    if prompt_only:
        if messages[-1]["role"] != "user":
            raise BadRecord(list_key, "must end with a user turn (the model answers it)")
    elif not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(list_key, "has no assistant turn (nothing to learn)")
    return messages


def parse_prompt_rounds(rounds: Any) -> list[dict]:
    """A prompt given as ``chat_rounds`` (an evaluation problem): the training roles, ending with a user turn.

    Raises:
        ValueError: ``field: problem`` (e.g. ``chat_rounds[1].role: unknown role 'x' ...``).
    """
    try:
        return _parse_chat_rounds(rounds, prompt_only=True)
    except BadRecord as e:
        raise ValueError(str(e)) from None
