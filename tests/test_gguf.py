"""`mft export --gguf / --ollama`: llama.cpp's converter (pinned) writes a GGUF that computes what the export does.

References: transformers' own GGUF loader reads the file back (logits equal to the merged HF export with its
matrices rounded to the GGUF type, which is what llama.cpp's f16 / bf16 keep; norms stay f32), the ``gguf``
package's reader gives the metadata, and a Go-template evaluator (tests/go_template.py) renders the Modelfile's
TEMPLATE for comparison with ChatFormat's text.

The tiny models carry a tiny sentencepiece tokenizer (320 pieces, trained here): transformers' GGUF loader parses
every vocabulary entry in Python, twice, which for SmolLM2's 49k tokens and merges took ~25 s of the last
attempt's 96 s. llama.cpp converts a sentencepiece ``tokenizer.model`` for llama and Qwen without a
pre-tokenizer hash check (a BPE tokenizer must be one llama.cpp knows: the bench converts SmolLM2's).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mft_components.assets.llama_cpp import prepare_llama_cpp_converter
from mft_components.data.templates import ChatFormat
from mft_components.inference.export import export_checkpoint
from mft_components.inference.gguf import MODELFILE, modelfile_text, ollama_template
from mft_components.inference.adapters import ExportError
from tests.go_template import render
from tests.test_export import peft_adapter, train_and_save
from tests.tiny_models import make_tiny_model_dir
from tests.tolerances import assert_close_rounding

IDS = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))


def _mft(*args) -> int:
    import cli

    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def converter():
    return prepare_llama_cpp_converter()


@pytest.fixture(scope="module")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    """A real sentencepiece BPE tokenizer of 320 pieces (byte fallback, ChatML markers as user symbols)."""
    import sentencepiece as spm

    text = ["def add(x, y):\n    return x + y\n", "SELECT name FROM users WHERE id = 3;",
            "Write a function that sorts a list of numbers.", "system human bot assistant user"] * 40
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=320, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity")
    root = tmp_path_factory.mktemp("sp_tokenizer")
    (root / "tokenizer.model").write_bytes(model.getvalue())
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return root


def _base(tmp_path: Path, family: str, tokenizer_dir: Path) -> Path:
    return make_tiny_model_dir(tmp_path / f"base_{family}", family=family, vocab_size=320,
                               tokenizer_dir=tokenizer_dir, seed=3)


def _q8_0(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` through the gguf package's own Q8_0 quantise and dequantise (blocks of 32 along each row)."""
    from gguf import GGMLQuantizationType, quants

    data = quants.quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    return torch.from_numpy(quants.dequantize(data, GGMLQuantizationType.Q8_0).copy()).reshape(weight.shape)


def _rounded_reference(export_dir: Path, dtype: torch.dtype | str):
    """The HF export with every matrix rounded to ``dtype`` or ``"q8_0"`` (what llama.cpp's files hold)."""
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(_q8_0(p) if dtype == "q8_0" else p.to(dtype).float())
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _metadata(gguf_path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    return {name: field.contents() for name, field in reader.fields.items()
            if name in ("tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "general.architecture",
                        "general.file_type")}


def _check_gguf(export_dir: Path, gguf_name: str, dtype: torch.dtype | str, architecture: str) -> None:
    gguf_model = AutoModelForCausalLM.from_pretrained(export_dir, gguf_file=gguf_name, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    got, rounded, full = _logits(gguf_model), _logits(_rounded_reference(export_dir, dtype)), _logits(exported)
    # Same weights, same float32 computation: equal up to summation order.
    assert_close_rounding(got, rounded, torch.float32, n=64)
    # Against the unrounded export: within the rounding of the weights to the GGUF type (Q8_0: 8 bits, 1/254 of
    # a block's largest weight, about bf16's precision).
    assert_close_rounding(got, full, torch.bfloat16 if dtype == "q8_0" else dtype, n=4)
    assert not torch.equal(full, _logits(AutoModelForCausalLM.from_pretrained(export_dir.parent / "other")))

    meta = _metadata(export_dir / gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    assert meta["general.architecture"] == architecture
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template  # the training format
    eos = json.loads((export_dir / "mft_chat_format.json").read_text())["eos_token"]
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids(eos)


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, sp_tokenizer_dir, converter) -> Path:
    """`mft export CKPT -o OUT --gguf --ollama` on a trained LoRA llama: merged HF export + f16 GGUF + Modelfile."""
    tmp_path = tmp_path_factory.mktemp("llama")
    base = _base(tmp_path, "llama", sp_tokenizer_dir)
    ck, _ = train_and_save(base, tmp_path / "run", "lora")
    shutil.copytree(base, tmp_path / "other")  # the untrained base: its logits must differ from the export's
    out = tmp_path / "out"
    assert _mft("export", ck, "--output", out, "--gguf", "--ollama") == 0
    return out


def test_checkpoint_to_gguf_f16_and_modelfile_llama(llama_export):
    _check_gguf(llama_export, "model-f16.gguf", torch.float16, "llama")
    modelfile = (llama_export / MODELFILE).read_text()
    assert "FROM ./model-f16.gguf\n" in modelfile and 'PARAMETER stop "</s>"\n' in modelfile


@pytest.mark.slow  # a third conversion: ~10-20 s on 2 shared cores
def test_q8_0_holds_the_gguf_package_quantisation(llama_export, capsys):
    assert _mft("export", llama_export, "--gguf", "--gguf-type", "q8_0") == 0, capsys.readouterr().err
    _check_gguf(llama_export, "model-q8_0.gguf", "q8_0", "llama")
    assert (llama_export / "model-q8_0.gguf").stat().st_size < 0.6 * (llama_export / "model-f16.gguf").stat().st_size


def test_export_dir_to_gguf_bf16_qwen2(tmp_path, sp_tokenizer_dir, converter, capsys):
    """`mft export EXPORT_DIR --gguf --gguf-type bf16` adds the GGUF to an earlier export (Qwen2: q/k/v biases, tied embeddings)."""
    base = _base(tmp_path, "qwen2", sp_tokenizer_dir)
    ck, _ = train_and_save(base, tmp_path / "run", "lora")
    shutil.copytree(base, tmp_path / "other")
    out = export_checkpoint(ck, tmp_path / "out")
    assert _mft("export", out, "--gguf", "--gguf-type", "bf16") == 0, capsys.readouterr().err
    _check_gguf(out, "model-bf16.gguf", torch.bfloat16, "qwen2")
    # A second run does not replace the file without --force.
    assert _mft("export", out, "--gguf", "--gguf-type", "bf16") == 2
    assert "already holds model-bf16.gguf; pass --force" in capsys.readouterr().err


@pytest.mark.slow  # transformers' GGUF loader parses SmolLM2's 49k-entry vocabulary in Python: ~25 s per load
def test_byte_level_bpe_tokenizer_smollm2(tmp_path, smollm2_dir, converter, capsys):
    """A real byte-level BPE tokenizer (SmolLM2's, which llama.cpp recognises by its pre-tokenizer hash)."""
    vocab = len(AutoTokenizer.from_pretrained(smollm2_dir))
    base = make_tiny_model_dir(tmp_path / "base", family="llama", vocab_size=vocab, tokenizer_dir=smollm2_dir, seed=3)
    ck, _ = train_and_save(base, tmp_path / "run", "lora")
    shutil.copytree(base, tmp_path / "other")
    assert _mft("export", ck, "--output", tmp_path / "out", "--gguf") == 0, capsys.readouterr().err
    _check_gguf(tmp_path / "out", "model-f16.gguf", torch.float16, "llama")


@pytest.mark.slow
@pytest.mark.parametrize("family,tokenizer,gguf_architecture", [
    ("mistral", "sentencepiece", "llama"),  # llama.cpp runs Mistral as its llama architecture
    ("starcoder2", "smollm2", "starcoder2"),
])
def test_other_shipped_families(family, tokenizer, gguf_architecture, tmp_path, sp_tokenizer_dir, smollm2_dir,
                                converter, capsys):
    """More families transformers' GGUF loader reads back (StarCoder2: LayerNorm, biases; llama.cpp converts it
    only with a byte-level BPE tokenizer it recognises, so SmolLM2's)."""
    tokenizer_dir = sp_tokenizer_dir if tokenizer == "sentencepiece" else smollm2_dir
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    base = make_tiny_model_dir(tmp_path / "base", family=family, vocab_size=vocab, tokenizer_dir=tokenizer_dir, seed=3)
    ck, _ = train_and_save(base, tmp_path / "run", "lora", target_modules="all-linear")
    shutil.copytree(base, tmp_path / "other")
    assert _mft("export", ck, "--output", tmp_path / "out", "--gguf") == 0, capsys.readouterr().err
    _check_gguf(tmp_path / "out", "model-f16.gguf", torch.float16, gguf_architecture)


# ----------------------------------------------------------------------------------------------------------------
# Refusals: messages, not tracebacks
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_gguf_type_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _mft("export", tmp_path / "ck", "--output", tmp_path / "out", "--gguf", "--gguf-type", "q4_k_m")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--gguf-type: invalid choice: 'q4_k_m'" in err and "'f16', 'bf16', 'q8_0'" in err
    assert not (tmp_path / "out").exists()


def test_family_llama_cpp_cannot_convert_is_refused(tmp_path, sp_tokenizer_dir, converter, capsys):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"architectures": ["TinyMadeUpForCausalLM"]}))
    (export / "mft_chat_format.json").write_text(json.dumps({"chat_format": None, "eos_token": "</s>"}))
    assert _mft("export", export, "--gguf") == 2
    err = capsys.readouterr().err
    assert f"{export / 'config.json'}: architectures ['TinyMadeUpForCausalLM']: llama.cpp's converter" in err
    assert "cannot convert this model family to GGUF" in err and "LlamaForCausalLM" in err
    assert "Traceback" not in err and sorted(p.name for p in export.iterdir()) == ["config.json", "mft_chat_format.json"]


def test_conversion_refused_after_the_hf_export_says_that_export_is_complete(tmp_path, sp_tokenizer_dir, converter,
                                                                             capsys):
    """`--adapter ... --gguf` on a base whose architecture llama.cpp does not know: the merged export stays."""
    base = _base(tmp_path, "llama", sp_tokenizer_dir)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["TinyMadeUpForCausalLM"]}))
    adapter = peft_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    assert _mft("export", "--adapter", adapter, "--base", base, "-o", out, "--gguf") == 2
    err = capsys.readouterr().err
    assert "cannot convert this model family to GGUF" in err
    assert f"(the Hugging Face export in {out} is complete; `mft export {out} --gguf` converts it again)" in err
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf")) and not list(out.glob(".*tmp*"))


def test_gguf_refusals_before_any_work(tmp_path, capsys):
    assert _mft("export", tmp_path, "--gguf") == 2
    assert "--output OUT_DIR is required" in capsys.readouterr().err
    assert _mft("export", tmp_path / "ck", "-o", tmp_path / "o", "--gguf", "--adapter-only") == 2
    assert "cannot go with --adapter-only" in capsys.readouterr().err
    export = tmp_path / "hf_export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "mft_chat_format.json").write_text(json.dumps({"chat_format": {"template": "hf"}, "eos_token": "</s>"}))
    assert _mft("export", export, "--ollama") == 2
    assert "trained with template: hf" in capsys.readouterr().err
    assert _mft("export", export, "--gguf", "-o", tmp_path / "elsewhere") == 2
    assert "is an export, not a checkpoint: --gguf / --ollama add to it in place" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Ollama TEMPLATE == ChatFormat
# ----------------------------------------------------------------------------------------------------------------

TWO_TURNS = [
    {"role": "system", "content": "You write SQL."},
    {"role": "user", "content": "All users?"},
    {"role": "assistant", "content": "SELECT * FROM users;"},
    {"role": "user", "content": "Only names,\nplease."},
    {"role": "assistant", "content": "SELECT name FROM users;"},
]


@pytest.mark.parametrize("chat_format", [
    ChatFormat(),
    ChatFormat(role_markers={"system": "<|im_start|>system\n", "user": "<|im_start|>user\n",
                             "assistant": "<|im_start|>assistant\n"}),
    ChatFormat(template="mftcoder_atorch"),
], ids=["mft", "chatml_markers", "mftcoder_atorch"])
def test_modelfile_template_renders_the_training_format(chat_format, smollm2_tokenizer):
    eos = smollm2_tokenizer.eos_token
    template = ollama_template(chat_format, eos)
    modelfile = modelfile_text(chat_format, eos, "model-f16.gguf")
    assert f'TEMPLATE """{template}"""' in modelfile and f'PARAMETER stop "{eos}"' in modelfile

    def go(messages):  # Ollama's data: .Messages with Role / Content
        return render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})

    # The inference prompt after the first turn, and the whole two-turn conversation as training renders it.
    assert go(TWO_TURNS[:4]) == chat_format.render_text(TWO_TURNS[:4], smollm2_tokenizer, add_generation_prompt=True)
    assert go(TWO_TURNS) == chat_format.render_text(TWO_TURNS, smollm2_tokenizer)
    assert go(TWO_TURNS[1:4]) == chat_format.render_text(TWO_TURNS[1:4], smollm2_tokenizer,
                                                         add_generation_prompt=True)


def test_modelfile_refuses_what_it_cannot_hold(smollm2_tokenizer):
    with pytest.raises(ExportError, match="role marker user .* contains '{{'"):
        ollama_template(ChatFormat(role_markers={"user": "{{user}}\n"}), "</s>")
    with pytest.raises(ExportError, match="cannot be written as a Modelfile stop parameter"):
        modelfile_text(ChatFormat(), 'say "stop"', "m.gguf")


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp itself (only where llama-cpp-python is installed: building it compiles llama.cpp, ~25 min)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_logits_and_greedy_tokens_agree(tmp_path, sp_tokenizer_dir, converter, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    base = _base(tmp_path, "llama", sp_tokenizer_dir)
    ck, _ = train_and_save(base, tmp_path / "run", "lora")
    out = tmp_path / "out"
    assert _mft("export", ck, "--output", out, "--gguf") == 0, capsys.readouterr().err
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = ChatFormat().prompt_ids([{"role": "user", "content": "def add(x, y):"}], tokenizer)
    llm = llama_cpp.Llama(str(out / "model-f16.gguf"), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(prompt)
    got = torch.from_numpy(np.array(llm.scores[:len(prompt)], dtype=np.float32))
    reference = _rounded_reference(out, torch.float16)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([prompt])).logits[0].float()
    tolerance = 2e-2 * float(expected.abs().max())  # llama.cpp's CPU matmul also rounds activations to f16
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=tolerance)
    # Greedy tokens: each one llama.cpp picks is the reference's argmax, or ties with it within the tolerance
    # (a random tiny model has near-ties that f16 arithmetic may break either way).
    llm.reset()
    ours = [t for t, _ in zip(llm.generate(prompt, temp=0.0), range(8))]
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor([prompt + ours])).logits[0].float()
    for i, token in enumerate(ours):
        step = ref[len(prompt) - 1 + i]
        assert step[token] >= step.max() - 2 * tolerance, (i, token, int(step.argmax()))
