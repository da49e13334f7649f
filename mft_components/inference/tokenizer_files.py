"""The exported tokenizer: saved with the training chat template, and checked to give the training ids.

``transformers`` 5 ``save_pretrained`` re-serialises a tokenizer from its loaded state and drops options it does
not keep as attributes. For SentencePiece Llama / Mistral tokenizers with ``legacy: true`` that changes the
ids: the re-loaded copy splits ``<s>human`` as ``h``, ``uman`` instead of ``▁human``. So the options that shape
tokenisation are written back from the training tokenizer's ``tokenizer_config.json`` where the save dropped
them, and the saved copy is loaded again and must tokenise a sample of texts exactly as the training tokenizer
did; a difference stops the export naming the text and both token lists.
"""

from __future__ import annotations

import json
from pathlib import Path

from mft_components.data.templates import ChatFormat
from mft_components.inference.adapters import ExportError

__all__ = ["TOKENISATION_KEYS", "save_tokenizer"]

# tokenizer_config.json keys that change the ids a tokenizer produces (or what it adds around them).
TOKENISATION_KEYS = ("legacy", "add_prefix_space", "add_bos_token", "add_eos_token", "add_dummy_prefix",
                     "sp_model_kwargs", "do_lower_case", "split_special_tokens", "clean_up_tokenization_spaces",
                     "spaces_between_special_tokens")

# Conversations and texts whose ids the exported tokenizer must reproduce: markers after BOS-like tokens, words
# at the start of a piece (where legacy SentencePiece differs), newlines, spaces, digits, code and non-ASCII.
_SAMPLE_CONVERSATIONS = (
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a function that reverses a list."},
     {"role": "assistant", "content": "def reverse(xs):\n    return xs[::-1]"}],
    [{"role": "user", "content": " human bot\n\n  indented\tTabs 12345 ümlaut 中文"},
     {"role": "assistant", "content": "hello world"},
     {"role": "user", "content": "again?"},
     {"role": "assistant", "content": "Yes."}],
)
_SAMPLE_TEXTS = ("hello world", " leading space", "<s>human\nhello", "line one\nline two\n", "x=1;y=[2, 3]")


def _dropped_keys(source_dir: Path | None, out_dir: Path) -> dict:
    """The tokenisation options of ``source_dir``'s tokenizer_config.json that the save left out of ``out_dir``'s."""
    if source_dir is None or not (source_dir / "tokenizer_config.json").is_file():
        return {}
    try:
        source = json.loads((source_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        saved = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # the verification below still compares ids
    return {k: source[k] for k in TOKENISATION_KEYS if k in source and k not in saved}


def _id_differences(trained, exported, chat_format: ChatFormat) -> str | None:
    """The first sample the two tokenizers tokenise differently, with both token lists; None if none does."""
    def tokens(tok, ids):
        return tok.convert_ids_to_tokens(ids)

    for messages in _SAMPLE_CONVERSATIONS:
        try:
            want, _ = chat_format.render(messages, trained)
        except Exception:  # noqa: BLE001 - a template: hf that refuses this shape (no system role): nothing to compare
            continue
        got, _ = chat_format.render(messages, exported)
        if want != got:
            text = chat_format.render_text(messages, trained)
            return f"the conversation {text!r}: training {tokens(trained, want)}, exported {tokens(exported, got)}"
    for text in _SAMPLE_TEXTS:
        for special in (False, True):
            want = trained(text, add_special_tokens=special)["input_ids"]
            got = exported(text, add_special_tokens=special)["input_ids"]
            if want != got:
                return (f"{text!r} (add_special_tokens={special}): training {tokens(trained, want)}, exported "
                        f"{tokens(exported, got)}")
    return None


def save_tokenizer(tokenizer, source_dir: Path | None, out_dir: Path, chat_format: ChatFormat,
                   trust_remote_code: bool = False) -> None:
    """Save ``tokenizer`` to ``out_dir`` with ``chat_format`` as its chat template, tokenising as in training.

    Args:
        tokenizer: the training tokenizer (loaded from ``source_dir``).
        source_dir: the directory it was loaded from; its tokenisation options are written back if dropped.
        out_dir: the export directory (exists).
        chat_format: the training format; becomes the ``chat_template``.
        trust_remote_code: passed to the re-load of the saved copy.

    Raises:
        ExportError: the saved tokenizer tokenises a sample differently (naming it and both token lists).
    """
    from transformers import AutoTokenizer

    tokenizer.chat_template = chat_format.jinja_chat_template(tokenizer)
    tokenizer.save_pretrained(out_dir)
    dropped = _dropped_keys(source_dir, out_dir)
    if dropped:
        config_path = out_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config_path.write_text(json.dumps({**config, **dropped}, indent=2, ensure_ascii=False) + "\n",
                               encoding="utf-8")
    exported = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=trust_remote_code)
    difference = _id_differences(tokenizer, exported, chat_format)
    if difference is not None:
        raise ExportError(f"the tokenizer saved to the export tokenises differently from the training tokenizer "
                          f"({source_dir}): {difference}; please report this with the tokenizer's files")
