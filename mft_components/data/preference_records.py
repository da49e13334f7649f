"""One line of a preference task file -> (prompt messages, chosen answer, rejected answer), or a bad record.

Accepted shapes (other keys, e.g. ``id`` or a failure ``reason``, are ignored):

* MFTCoder's xxpo shape: ``chosen`` and ``rejected`` are chat lists (``{"role", "content"}`` turns, roles as in
  SFT: ``system``, ``human``/``user``, ``bot``/``assistant``/``gpt``) that share every turn but the last, which is
  the assistant's answer; the prompt is ``chosen[:-1]``.
* TRL's explicit-prompt shape: ``prompt`` is a string or a chat list ending with a user turn; ``chosen`` and
  ``rejected`` are strings or chat lists of one assistant turn; an optional ``system`` string goes first (a
  string prompt only; an empty one adds no system turn, as in SFT).

Bad records raise ``BadRecord(field, problem)``, reported as ``path:line: field: problem`` by the data build:
chosen and rejected with different prompts, an empty answer, chosen identical to rejected, a missing key, a
turn with an unknown role, roles that do not alternate.
"""

from __future__ import annotations

from typing import Any

from mft_components.data.records import BadRecord, _check_answer, _check_text, _kind, _parse_chat_rounds

__all__ = ["PreferenceRecord", "parse_preference_record"]

# (prompt messages with roles system/user/assistant ending in a user turn, chosen answer, rejected answer)
PreferenceRecord = tuple[list[dict], str, str]


def _conversation(value: Any, field: str) -> list[dict]:
    """A chat list checked as SFT checks ``chat_rounds``; the field names in problems say ``chosen[1]...``."""
    try:
        return _parse_chat_rounds(value)
    except BadRecord as e:
        raise BadRecord(e.field.replace("chat_rounds", field, 1), e.problem) from None


def _answer(value: Any, field: str) -> str:
    """One assistant answer given as a string or as a chat list holding one assistant turn."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise BadRecord(field, f"expected a string or a list of one assistant turn, got {len(value)} item(s)")
        role = value[0].get("role")
        if not isinstance(role, str) or role.lower() not in ("assistant", "bot", "gpt"):
            raise BadRecord(f"{field}[0].role", f"expected an assistant turn, got {role!r}")
        if "content" not in value[0]:
            raise BadRecord(f"{field}[0].content", "missing")
        text = _check_text(value[0]["content"], f"{field}[0].content")
        where = f"{field}[0].content"
    else:
        text, where = _check_text(value, field), field
    _check_answer(text, where)
    return text


def _prompt(record: dict) -> list[dict]:
    prompt = record["prompt"]
    if isinstance(prompt, list):
        try:
            messages = _parse_chat_rounds(prompt, prompt_only=True)
        except BadRecord as e:
            raise BadRecord(e.field.replace("chat_rounds", "prompt", 1), e.problem) from None
        if record.get("system"):
            raise BadRecord("system", "give the system turn inside the prompt list, not beside it")
        return messages
    text = _check_text(prompt, "prompt")
    messages = []
    if record.get("system") is not None and _check_text(record["system"], "system"):
        messages.append({"role": "system", "content": record["system"]})
    return messages + [{"role": "user", "content": text}]


def parse_preference_record(record: Any) -> PreferenceRecord:
    """Validate one JSON preference record and normalise it.

    Returns:
        ``(prompt messages, chosen answer, rejected answer)``; the prompt ends with a user turn.

    Raises:
        BadRecord: the offending field and what is wrong with it.
    """
    if not isinstance(record, dict):
        raise BadRecord("record", f"expected a JSON object, got {_kind(record)}")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise BadRecord(key, "missing; a preference record has chosen and rejected (and prompt, unless they "
                                 "are chat lists sharing the prompt)")
    if "prompt" in record:
        prompt = _prompt(record)
        chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
    else:
        if not isinstance(record["chosen"], list) or not isinstance(record["rejected"], list):
            raise BadRecord("prompt", "missing; without it chosen and rejected must be chat lists that share every "
                                      "turn but the last (MFTCoder's xxpo shape)")
        chosen_turns = _conversation(record["chosen"], "chosen")
        rejected_turns = _conversation(record["rejected"], "rejected")
        for key, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
            if turns[-1]["role"] != "assistant":
                raise BadRecord(f"{key}[{len(turns) - 1}].role", "the last turn must be the assistant's answer")
        prompt = chosen_turns[:-1]
        if rejected_turns[:-1] != prompt:
            differ = next((i for i, (a, b) in enumerate(zip(prompt, rejected_turns[:-1])) if a != b),
                          min(len(prompt), len(rejected_turns) - 1))
            raise BadRecord("rejected", f"different prompt from chosen (turn {differ} differs); chosen and rejected "
                                        "must share every turn but the last")
        chosen, rejected = chosen_turns[-1]["content"], rejected_turns[-1]["content"]
    if chosen == rejected:
        raise BadRecord("rejected", "identical to chosen (nothing to prefer); drop the record")
    return prompt, chosen, rejected
