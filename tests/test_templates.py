"""Tests for mft_components/data/templates.py with the real SmolLM2-135M-Instruct tokenizer."""

from __future__ import annotations

import copy

import pytest

from mft_components.data.templates import ChatFormat

EOS = "<|im_end|>"

SINGLE = [{"role": "user", "content": "Write add(a, b)."}, {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]
MULTI = [
    {"role": "system", "content": "You are a careful Python programmer."},
    {"role": "user", "content": "Reverse a list."},
    {"role": "assistant", "content": "```python\nxs[::-1]\n```"},
    {"role": "user", "content": "Now sort it, descending."},
    {"role": "assistant", "content": "sorted(xs, reverse=True)"},
]


def loss_runs(ids, mask, tok):
    """Decoded text of each maximal run of loss-carrying tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def whole_text_ids(text, tok):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_mft_single_turn_byte_exact(smollm2_tokenizer):
    tok = smollm2_tokenizer
    fmt = ChatFormat()
    expected = "<s>human\nWrite add(a, b).\n<s>bot\ndef add(a, b):\n    return a + b\n" + EOS + "\n"
    assert fmt.render_text(SINGLE, tok) == expected
    ids, mask = fmt.render(SINGLE, tok)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == expected
    # Segment tokenisation cuts only where the byte-level pre-tokenizer splits: same ids as whole-text encoding.
    assert ids == whole_text_ids(expected, tok)
    assert loss_runs(ids, mask, tok) == ["def add(a, b):\n    return a + b\n" + EOS]
    assert [ids[-1]] == tok.encode("\n", add_special_tokens=False) and not mask[-1]  # the \n after EOS carries no loss
    assert ids[0] != tok.bos_token_id


def test_mft_multi_turn_with_system(smollm2_tokenizer):
    tok = smollm2_tokenizer
    fmt = ChatFormat()
    expected = (
        "<s>system\nYou are a careful Python programmer.\n"
        "<s>human\nReverse a list.\n<s>bot\n```python\nxs[::-1]\n```\n" + EOS + "\n"
        "<s>human\nNow sort it, descending.\n<s>bot\nsorted(xs, reverse=True)\n" + EOS + "\n"
    )
    ids, mask = fmt.render(MULTI, tok)
    assert fmt.render_text(MULTI, tok) == expected
    assert tok.decode(ids) == expected
    assert ids == whole_text_ids(expected, tok)
    # Every assistant turn is learned, each with its EOS.
    assert loss_runs(ids, mask, tok) == ["```python\nxs[::-1]\n```\n" + EOS, "sorted(xs, reverse=True)\n" + EOS]
    # No-loss tokens are exactly the rest of the text, in order.
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == (
        "<s>system\nYou are a careful Python programmer.\n<s>human\nReverse a list.\n<s>bot\n"
        "\n<s>human\nNow sort it, descending.\n<s>bot\n\n"
    )


def test_prompt_ids_is_prefix_of_render(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for fmt in (ChatFormat(), ChatFormat(template="hf"), ChatFormat(add_bos=True)):
        for conv in (SINGLE, MULTI, [{"role": "user", "content": "\n  leading space"}, {"role": "assistant", "content": " x\n"}]):
            ids, mask = fmt.render(conv, tok)
            last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
            prompt = fmt.prompt_ids(conv[: last_user + 1], tok)
            assert ids[: len(prompt)] == prompt, fmt
            assert not mask[len(prompt) - 1]
            assert mask[len(prompt)], "the assistant content starts right after the prompt"
            # A trailing assistant turn is ignored by prompt_ids.
            assert fmt.prompt_ids(conv, tok) == prompt


def test_custom_role_markers(smollm2_tokenizer):
    tok = smollm2_tokenizer
    fmt = ChatFormat.from_config(
        {"role_markers": {"system": "### System:\n", "user": "### Instruction:\n", "assistant": "### Response:\n"}}
    )
    ids, mask = fmt.render(MULTI, tok)
    expected = (
        "### System:\nYou are a careful Python programmer.\n"
        "### Instruction:\nReverse a list.\n### Response:\n```python\nxs[::-1]\n```\n" + EOS + "\n"
        "### Instruction:\nNow sort it, descending.\n### Response:\nsorted(xs, reverse=True)\n" + EOS + "\n"
    )
    assert tok.decode(ids) == expected
    assert loss_runs(ids, mask, tok) == ["```python\nxs[::-1]\n```\n" + EOS, "sorted(xs, reverse=True)\n" + EOS]
    # Partial overrides keep the other defaults.
    partial = ChatFormat.from_config({"role_markers": {"assistant": "### Response:\n"}})
    assert partial.role_markers["user"] == "<s>human\n"


def test_hf_template_matches_tokenizer_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    fmt = ChatFormat(template="hf")
    ids, mask = fmt.render(MULTI, tok)
    reference = tok.apply_chat_template(MULTI, tokenize=False)
    assert tok.decode(ids) == reference
    assert ids == whole_text_ids(reference, tok)
    assert loss_runs(ids, mask, tok) == ["```python\nxs[::-1]\n```" + EOS, "sorted(xs, reverse=True)" + EOS]
    # SmolLM2's template adds a default system prompt when there is none: rendering prefixes copes with it.
    ids, mask = fmt.render(SINGLE, tok)
    assert tok.decode(ids) == tok.apply_chat_template(SINGLE, tokenize=False)
    assert loss_runs(ids, mask, tok) == ["def add(a, b):\n    return a + b" + EOS]
    prompt = fmt.prompt_ids(SINGLE, tok)
    assert prompt == whole_text_ids(tok.apply_chat_template(SINGLE[:1], tokenize=False, add_generation_prompt=True), tok)


def test_jinja_chat_template_reproduces_format(smollm2_tokenizer):
    tok = smollm2_tokenizer
    odd = {"system": 'Sys "quoted" \\ é\n', "user": "User 用户:\n", "assistant": "### Réponse:\n"}
    for fmt in (ChatFormat(), ChatFormat(role_markers=odd), ChatFormat(add_bos=True), ChatFormat(template="hf")):
        template = fmt.jinja_chat_template(tok)
        for conv in (SINGLE, MULTI):
            prompt_msgs = conv[:-1]
            text = tok.apply_chat_template(prompt_msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
            assert text == fmt.render_text(prompt_msgs, tok, add_generation_prompt=True)
            assert whole_text_ids(text, tok) == fmt.prompt_ids(prompt_msgs, tok)
            full = tok.apply_chat_template(conv, chat_template=template, tokenize=False)
            assert full == fmt.render_text(conv, tok)


def test_add_bos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, mask = ChatFormat(add_bos=True).render(SINGLE, tok)
    plain, _ = ChatFormat().render(SINGLE, tok)
    assert ids[0] == tok.bos_token_id and not mask[0] and ids[1:] == plain


def test_text_segments_all_loss(smollm2_tokenizer):
    from mft_components.data.templates import encode_segments

    tok = smollm2_tokenizer
    (ids, mask), = encode_segments([ChatFormat().text_segments("print('hi')", tok)], tok)
    assert tok.decode(ids) == "print('hi')\n" + EOS and all(mask)  # MFTCoder's text + "\n" + EOS
    atorch = ChatFormat(template="mftcoder_atorch")
    (ids, mask), = encode_segments([atorch.text_segments("print('hi')", tok)], tok)
    assert tok.decode(ids) == "print('hi')" + EOS and all(mask)


def test_config_roundtrip_and_errors():
    fmt = ChatFormat.from_config({"template": "mft", "role_markers": {"user": "Q: "}, "add_bos": True})
    assert ChatFormat.from_config(fmt.to_dict()) == fmt
    assert ChatFormat.from_config(None) == ChatFormat()
    with pytest.raises(ValueError, match="template"):
        ChatFormat.from_config({"template": "chatml"})
    with pytest.raises(ValueError, match="role_markers.bot"):
        ChatFormat.from_config({"role_markers": {"bot": "B: "}})
    with pytest.raises(ValueError, match="unknown key"):
        ChatFormat.from_config({"markers": {}})


def test_unknown_role_rejected(smollm2_tokenizer):
    with pytest.raises(ValueError, match="role 'bot'"):
        ChatFormat().render([{"role": "bot", "content": "x"}], smollm2_tokenizer)


def test_encode_texts_equals_tokenizer_call(smollm2_tokenizer):
    from mft_components.data.templates import encode_texts

    tok = smollm2_tokenizer
    texts = ["def f(x):\n    return x", "  leading\n\n\ttabs", "<|im_end|> special inside", "", "héllo 用户 🙂"]
    assert encode_texts(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------- MFTCoder's atorch format

ROLE_TAGS = {"system": "<|role_start|>system<|role_end|>", "user": "<|role_start|>human<|role_end|>",
             "assistant": "<|role_start|>bot<|role_end|>"}
# Contents that start and end with letters: tokenising the whole rendered text cuts where the pieces are cut.
ATORCH_CONV = [
    {"role": "system", "content": "You write Python"},
    {"role": "user", "content": "Write a function that sorts xs"},
    {"role": "assistant", "content": "def f(xs):\n    return sorted(xs)"},
    {"role": "user", "content": "Now reverse it"},
    {"role": "assistant", "content": "sorted(xs, reverse=True)"},
]


@pytest.fixture(scope="module")
def neox_tokenizer(smollm2_tokenizer):
    """A GPT-NeoX tokenizer class over a byte-level BPE (SmolLM2's vocabulary), EOS <|endoftext|>."""
    from transformers import GPTNeoXTokenizerFast

    return GPTNeoXTokenizerFast(tokenizer_object=smollm2_tokenizer.backend_tokenizer, eos_token="<|endoftext|>",
                                bos_token="<|endoftext|>")


def atorch_reference(messages, tok) -> tuple[list[int], list[bool]]:
    """MFTCoder atorch's tokenisation (``UniformEncoder._tokenize_fields``, chatML records): each role marker and
    each content encoded on its own; a bot content is followed by EOS; loss on bot content and EOS only."""
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids, mask = [], []
    for m in messages:
        content = enc(m["content"]) + ([tok.eos_token_id] if m["role"] == "assistant" else [])
        marker = enc(ROLE_TAGS[m["role"]])
        ids += marker + content
        mask += [False] * len(marker) + [m["role"] == "assistant"] * len(content)
    return ids, mask


def test_mftcoder_atorch_text_mask_and_chat_template_round_trip(neox_tokenizer):
    tok = neox_tokenizer
    fmt = ChatFormat.from_config({"template": "mftcoder_atorch"})
    eos = "<|endoftext|>"
    expected = (
        "<|role_start|>system<|role_end|>You write Python"
        "<|role_start|>human<|role_end|>Write a function that sorts xs"
        "<|role_start|>bot<|role_end|>def f(xs):\n    return sorted(xs)" + eos
        + "<|role_start|>human<|role_end|>Now reverse it"
        "<|role_start|>bot<|role_end|>sorted(xs, reverse=True)" + eos
    )
    assert fmt.render_text(ATORCH_CONV, tok) == expected
    ids, mask = fmt.render(ATORCH_CONV, tok)
    assert (ids, mask) == atorch_reference(ATORCH_CONV, tok)
    assert loss_runs(ids, mask, tok) == ["def f(xs):\n    return sorted(xs)" + eos, "sorted(xs, reverse=True)" + eos]
    assert ids == whole_text_ids(expected, tok)
    # The exported chat_template renders the same text: for training (whole conversation) and for inference.
    tok = copy.copy(tok)
    tok.chat_template = fmt.jinja_chat_template(tok)
    assert tok.apply_chat_template(ATORCH_CONV, tokenize=False) == expected
    prompt_text = tok.apply_chat_template(ATORCH_CONV[:4], tokenize=False, add_generation_prompt=True)
    assert prompt_text == fmt.render_text(ATORCH_CONV[:4], tok, add_generation_prompt=True)
    assert prompt_text == expected[: expected.index("sorted(xs, reverse")]  # MFTCoder's: ends with the bot tag
    prompt = fmt.prompt_ids(ATORCH_CONV[:4], tok)
    assert prompt == whole_text_ids(prompt_text, tok) == ids[: len(prompt)] and mask[len(prompt)]
    # Config round trip; its markers are fixed.
    assert ChatFormat.from_config(fmt.to_dict()) == fmt and fmt.role_markers == ROLE_TAGS
    with pytest.raises(ValueError, match="fixed markers"):
        ChatFormat.from_config({"template": "mftcoder_atorch", "role_markers": {"user": "Q: "}})


def test_mftcoder_atorch_pieces_are_tokenised_apart_as_mftcoder_does(neox_tokenizer):
    # Punctuation next to a marker: a byte-level BPE over the whole text merges ".<|"; MFTCoder (and mft) encode
    # the content and the marker apart. The text, and so the chat_template's rendering, is the same.
    tok = neox_tokenizer
    fmt = ChatFormat(template="mftcoder_atorch")
    conv = [{"role": "user", "content": "Sort xs."}, {"role": "assistant", "content": "(sorted(xs))"}]
    ids, mask = fmt.render(conv, tok)
    assert (ids, mask) == atorch_reference(conv, tok)
    assert tok.decode(ids) == fmt.render_text(conv, tok)
    assert ids != whole_text_ids(fmt.render_text(conv, tok), tok)
