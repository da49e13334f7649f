"""Chat formats: conversations -> token ids + loss mask, and the same prompt format for inference.

The default ``mft`` format is MFTCoder's. For a conversation (system S, user Q1, assistant A1, user Q2,
assistant A2) the rendered text is::

    <s>system\\nS\\n<s>human\\nQ1\\n<s>bot\\nA1\\n<EOS>\\n<s>human\\nQ2\\n<s>bot\\nA2\\n<EOS>\\n
                                          ~~~~~~~~~~~~                     ~~~~~~~~~~~~
                                          loss                             loss

Every content is followed by ``\\n``; EOS (the tokenizer's) follows each assistant content and a ``\\n`` follows
each EOS. Only ``A_i\\n<EOS>`` carries loss, for every assistant turn; markers, prompts and the ``\\n`` after EOS
carry none. No BOS unless ``add_bos``. ``role_markers`` replaces the three markers; ``template: hf`` uses the
tokenizer's own ``chat_template`` instead (loss on the assistant turns, found by rendering prefixes).

``template: mftcoder_atorch`` is the format of MFTCoder's atorch (GPT-NeoX) pipeline: fixed markers, nothing
between the pieces, EOS after each assistant content (with loss), as its README shows for training and inference::

    <|role_start|>system<|role_end|>S<|role_start|>human<|role_end|>Q1<|role_start|>bot<|role_end|>A1<EOS><|role_start|>human<|role_end|>...
                                                                                                   ~~~~~~~~~
                                                                                                   loss

Each marker and each content is tokenised on its own, as MFTCoder's atorch tokenisation does, so the ids are
its ids. A tokenizer that encodes the whole rendered text (a ``chat_template`` consumer) gets the same ids
wherever a content starts and ends with a letter, digit or space; a byte-level BPE may merge punctuation across
a marker boundary (``.<|`` after "sort."), as it does for MFTCoder's own inference prompts.

Tokenisation is by segments: the text is cut at the loss boundaries (before each assistant content, around
each EOS), each piece is tokenised on its own (``add_special_tokens=False``) and the EOS is inserted as its id. So a loss boundary is
always a token boundary, and ``prompt_ids`` (what ``generate``/export feed the model) is exactly the prefix of
``render`` ids up to the assistant content: the model is trained on the ids it sees at inference. Pieces are
cut where a byte-level BPE pre-tokenizer splits anyway (after ``\\n`` before ``<``), so for ordinary text the
ids also equal tokenising the whole rendered text at once (what a HF ``chat_template`` consumer does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

ROLES = ("system", "user", "assistant")
DEFAULT_ROLE_MARKERS = {"system": "<s>system\n", "user": "<s>human\n", "assistant": "<s>bot\n"}
ATORCH_ROLE_MARKERS = {
    "system": "<|role_start|>system<|role_end|>",
    "user": "<|role_start|>human<|role_end|>",
    "assistant": "<|role_start|>bot<|role_end|>",
}
TEMPLATES = ("mft", "hf", "mftcoder_atorch")
_NO_CHAT_TEMPLATE = "data.template is 'hf' but the tokenizer has no chat_template; use template: mft"

# A segment is a piece of text (tokenised on its own) or a single token id, and whether it carries loss.
Segment = tuple["str | int", bool]


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added (what ``tokenizer(texts, add_special_tokens=False)``
    returns; through the Rust backend's ``encode_batch_fast`` when there is one, which skips offsets and is
    ~20% faster, the bulk of a cold data build)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_segments(segment_lists: Sequence[Sequence[Segment]], tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Tokenise many segment lists with one batched tokenizer call.

    Args:
        segment_lists: per conversation, its segments from ``ChatFormat.segments`` (text or token id, loss flag).
        tokenizer: a Hugging Face tokenizer.

    Returns:
        Per conversation ``(ids, loss_mask)``.
    """
    texts = [seg for segs in segment_lists for seg, _ in segs if isinstance(seg, str)]
    encoded = iter(encode_texts(tokenizer, texts))
    out = []
    for segs in segment_lists:
        ids: list[int] = []
        mask: list[bool] = []
        for seg, loss in segs:
            piece = next(encoded) if isinstance(seg, str) else [seg]
            ids.extend(piece)
            mask.extend([loss] * len(piece))
        out.append((ids, mask))
    return out


def _eos(tokenizer) -> tuple[str, int]:
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)}: has no eos_token, which ends "
                         "every assistant turn; use a tokenizer that defines one (eos_token in tokenizer_config.json)")
    return tokenizer.eos_token, tokenizer.eos_token_id


def _check_messages(messages: Sequence[dict]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i}: role {m.get('role')!r} is not one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string, got {type(m.get('content')).__name__}")


@dataclass
class ChatFormat:
    """How conversations become text and tokens, for training and for inference alike.

    Args:
        template: ``"mft"`` (MFTCoder's markers), ``"hf"`` (the tokenizer's ``chat_template``) or
            ``"mftcoder_atorch"`` (MFTCoder's atorch format, fixed markers).
        role_markers: ``{system, user, assistant}`` marker strings for ``template: mft``; missing keys keep
            their defaults (``<s>system\\n``, ``<s>human\\n``, ``<s>bot\\n``).
        add_bos: prepend the tokenizer's BOS token (no loss).
    """

    template: str = "mft"
    role_markers: dict[str, str] = field(default_factory=dict)  # filled with the template's markers
    add_bos: bool = False

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"data.template: expected one of {TEMPLATES}, got {self.template!r}")
        if self.template == "mftcoder_atorch":
            if self.role_markers and dict(self.role_markers) != ATORCH_ROLE_MARKERS:
                raise ValueError("data.role_markers: template mftcoder_atorch has fixed markers; remove "
                                 "role_markers, or use template: mft with your markers")
            self.role_markers = dict(ATORCH_ROLE_MARKERS)
            self.add_bos = bool(self.add_bos)
            return
        markers = dict(DEFAULT_ROLE_MARKERS)
        for key, value in dict(self.role_markers or {}).items():
            if key not in ROLES:
                raise ValueError(f"data.role_markers.{key}: unknown role; expected keys {ROLES}")
            if not isinstance(value, str) or not value:
                raise ValueError(f"data.role_markers.{key}: expected a non-empty string, got {value!r}")
            markers[key] = value
        self.role_markers = markers
        self.add_bos = bool(self.add_bos)

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict | None) -> "ChatFormat":
        """Build from a config node ``{template, role_markers, add_bos}`` (or None for the defaults).

        Raises:
            ValueError: on an unknown key or value, naming it.
        """
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"template", "role_markers", "add_bos"}
        if unknown:
            raise ValueError(f"chat format: unknown key(s) {sorted(unknown)}; expected template, role_markers, add_bos")
        return cls(
            template=cfg.get("template") or "mft",
            role_markers=dict(cfg.get("role_markers") or {}),
            add_bos=bool(cfg.get("add_bos", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The config node that ``from_config`` turns back into this format (stored in checkpoints)."""
        return {"template": self.template, "role_markers": dict(self.role_markers), "add_bos": self.add_bos}

    def check_tokenizer(self, tokenizer) -> None:
        """Raise what every conversation would raise with this tokenizer, once: no EOS, no BOS for ``add_bos``,
        no ``chat_template`` for ``template: hf``.

        Raises:
            ValueError: naming the tokenizer and what it lacks.
        """
        _eos(tokenizer)
        self._bos_segment(tokenizer)
        if self.template == "hf" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(_NO_CHAT_TEMPLATE)

    # ------------------------------------------------------------------------------------------------------------
    def segments(self, messages: Sequence[dict], tokenizer, add_generation_prompt: bool = False) -> list[Segment]:
        """The conversation cut into pieces that are tokenised separately, each with its loss flag.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            tokenizer: a Hugging Face tokenizer (gives EOS, BOS and, for ``hf``, the chat template).
            add_generation_prompt: end with the assistant marker (inference prompt) instead of the last turn's
                end. The prompt is then the history up to the last message, which should be a user turn.

        Returns:
            ``[(text_or_token_id, carries_loss), ...]``.
        """
        _check_messages(messages)
        if self.template == "hf":
            segs = self._hf_segments(messages, tokenizer, add_generation_prompt)
        else:
            segs = self._mft_segments(messages, tokenizer, add_generation_prompt)
        return segs

    @property
    def _separator(self) -> str:
        """What follows each content and each EOS: a newline in MFTCoder's accelerate format, nothing in atorch's."""
        return "" if self.template == "mftcoder_atorch" else "\n"

    def _bos_segment(self, tokenizer) -> list[Segment]:
        if not self.add_bos:
            return []
        if tokenizer.bos_token_id is None:
            raise ValueError("data.add_bos is true but the tokenizer has no bos_token")
        return [(tokenizer.bos_token_id, False)]

    def _mft_segments(self, messages, tokenizer, add_generation_prompt) -> list[Segment]:
        _, eos_id = _eos(tokenizer)
        marker, sep = self.role_markers, self._separator
        # mft: no-loss text is cut only before assistant content and at EOS (where a byte-level BPE splits anyway).
        # atorch: every marker and every content is a piece of its own, as MFTCoder's atorch tokenisation has it.
        separate = self.template == "mftcoder_atorch"
        segs: list[Segment] = self._bos_segment(tokenizer)
        pending = ""  # no-loss text not yet emitted

        def no_loss(*texts: str) -> None:
            nonlocal pending
            for text in texts:
                if separate:
                    if text:
                        segs.append((text, False))
                else:
                    pending += text

        for m in messages:
            role, content = m["role"], m["content"]
            if role == "assistant":
                no_loss(marker["assistant"])
                if pending:
                    segs.append((pending, False))
                segs.append((content + sep, True))
                segs.append((eos_id, True))
                pending = sep
            else:
                no_loss(marker[role], content + sep)
        if add_generation_prompt:
            no_loss(marker["assistant"])
        if pending:
            segs.append((pending, False))
        return segs

    def _hf_render(self, tokenizer, messages, add_generation_prompt: bool) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(_NO_CHAT_TEMPLATE)
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def _hf_segments(self, messages, tokenizer, add_generation_prompt) -> list[Segment]:
        eos_text, _ = _eos(tokenizer)
        full = self._hf_render(tokenizer, messages, add_generation_prompt)
        # Assistant turn i spans from the end of the prompt for messages[:i] (rendered with the generation
        # prompt) to the end of the rendering of messages[:i+1]. Templates that rewrite history (e.g. drop
        # reasoning from earlier turns) are not prefix-stable; we refuse them rather than mis-mask.
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("template: hf: a conversation cannot start with an assistant turn")
            before = self._hf_render(tokenizer, messages[:i], True)
            through = self._hf_render(tokenizer, messages[: i + 1], False)
            if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
                raise ValueError(
                    "template: hf: the tokenizer's chat_template does not render conversations prefix-stably "
                    f"(assistant turn {i}); loss spans cannot be located, use template: mft"
                )
            start, end = len(before), len(through)
            # Loss on the content and its end-of-turn token, not on whitespace the template puts after it.
            cut = through.rfind(eos_text, start, end)
            if cut != -1:
                end = cut + len(eos_text)
            spans.append((start, end))
        segs: list[Segment] = []
        prefix_bos = self.add_bos and not (tokenizer.bos_token and full.startswith(tokenizer.bos_token))
        if prefix_bos:
            segs += self._bos_segment(tokenizer)
        pos = 0
        for start, end in spans:
            if start > pos:
                segs.append((full[pos:start], False))
            segs.append((full[start:end], True))
            pos = end
        if pos < len(full):
            segs.append((full[pos:], False))
        return segs

    # ------------------------------------------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], tokenizer) -> tuple[list[int], list[bool]]:
        """Token ids and loss mask of a training conversation.

        Args:
            messages: normalised messages (roles ``system``/``user``/``assistant``).
            tokenizer: a Hugging Face tokenizer.

        Returns:
            ``(ids, loss_mask)``; ``loss_mask[i]`` is True when token i is a training target.

        Raises:
            ValueError: on an unknown role or a tokenizer without EOS.
        """
        return encode_segments([self.segments(messages, tokenizer)], tokenizer)[0]

    def prompt_ids(self, messages: Sequence[dict], tokenizer) -> list[int]:
        """The inference prompt: history + the last user turn, ending with the assistant marker.

        Equal to the prefix of ``render(...)`` ids of the same conversation continued by an assistant turn.
        A trailing assistant message is dropped (the prompt is what precedes it).
        """
        messages = list(messages)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return encode_segments([self.segments(messages, tokenizer, add_generation_prompt=True)], tokenizer)[0][0]

    def render_text(self, messages: Sequence[dict], tokenizer, add_generation_prompt: bool = False) -> str:
        """The rendered text (special tokens written as their strings), e.g. for display or comparison."""
        out = []
        for seg, _ in self.segments(messages, tokenizer, add_generation_prompt):
            out.append(seg if isinstance(seg, str) else tokenizer.convert_ids_to_tokens(seg))
        return "".join(out)

    def text_segments(self, text: str, tokenizer) -> list[Segment]:
        """Segments of a plain ``text`` record: every token carries loss, then EOS (also with loss).

        ``template: mft`` trains ``text\n<EOS>`` as MFTCoder's accelerate pipeline does (its ``content_format``
        appends the newline to every content, text records included); atorch's format and ``hf`` add nothing.
        """
        _, eos_id = _eos(tokenizer)
        return self._bos_segment(tokenizer) + [(text + ("\n" if self.template == "mft" else ""), True),
                                               (eos_id, True)]

    # ------------------------------------------------------------------------------------------------------------
    def jinja_chat_template(self, tokenizer) -> str:
        """A Hugging Face ``chat_template`` that renders exactly this training format.

        ``tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)`` with it equals
        ``render_text(msgs, tokenizer, add_generation_prompt=True)``. Roles may be named as in transformers
        (``user``/``assistant``) or as in MFTCoder's data and its shipped templates (``human``/``bot``, ``gpt``).
        For ``template: hf`` it is the tokenizer's.
        """
        if self.template == "hf":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(_NO_CHAT_TEMPLATE)
            return tokenizer.chat_template

        def lit(s: str) -> str:
            # A Jinja string literal: Jinja unescapes literals with Python's unicode-escape, which accepts
            # JSON's escapes (\n, \", \\, \u00XX) and passes non-ASCII through.
            return json.dumps(s, ensure_ascii=False)

        m, sep = self.role_markers, lit(self._separator)
        return (
            ("{{- bos_token -}}" if self.add_bos else "")
            + "{%- for message in messages -%}"
            + "{%- if message['role'] == 'system' -%}"
            + "{{- " + lit(m["system"]) + " + message['content'] + " + sep + " -}}"
            + "{%- elif message['role'] in ['user', 'human'] -%}"
            + "{{- " + lit(m["user"]) + " + message['content'] + " + sep + " -}}"
            + "{%- elif message['role'] in ['assistant', 'bot', 'gpt'] -%}"
            + "{{- " + lit(m["assistant"]) + " + message['content'] + " + sep + " + eos_token + " + sep + " -}}"
            + "{%- else -%}{{- raise_exception('unknown role: ' + message['role']) -}}"
            + "{%- endif -%}"
            + "{%- endfor -%}"
            + "{%- if add_generation_prompt -%}{{- " + lit(m["assistant"]) + " -}}{%- endif -%}"
        )

