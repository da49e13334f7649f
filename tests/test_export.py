"""`mft export`: the exported directory computes what the trained model computed, in every layout.

The training side is built with the real components (tiny model dir, `build_model` with LoRA / QLoRA / full,
`lora_b` perturbed so the adapter is non-trivial, `checkpoint.save_checkpoint`); references are the trained model
itself, an independent float32 merge onto the original base, and `peft`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mft_components.training import checkpoint as ckpt
from mft_components.inference import export, shards
from mft_components.inference.adapters import ExportError
from mft_components.inference.export import export_checkpoint
from mft_components.models.lora import (
    LoRALinear,
    adapter_to_peft_state_dict,
    get_adapter_state_dict,
    lora_target_names,
    peft_adapter_config,
)
from mft_components.models import build_model
from mft_components.models.expert_lora import lora_target_parameters
from mft_components.data.templates import ChatFormat
from tests.tiny_models import TINY_CONFIGS, make_tiny_model_dir

TASKS = ["code_completion", "text2sql"]


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory, smollm2_dir):
    """Tiny llama (untied) and qwen2 (tied embeddings, q/k/v biases) dirs with the real SmolLM2 tokenizer."""
    root = tmp_path_factory.mktemp("bases")
    vocab = len(AutoTokenizer.from_pretrained(smollm2_dir))
    return {f: make_tiny_model_dir(root / f, family=f, vocab_size=vocab, tokenizer_dir=smollm2_dir, seed=1)
            for f in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def llama_lora(tiny_bases, tmp_path_factory):
    """One trained LoRA checkpoint on the llama base, shared by the tests that only read it."""
    return train_and_save(tiny_bases["llama"], tmp_path_factory.mktemp("llama_lora"), "lora")


def copy_checkpoint(ck: Path, dest: Path, **meta_updates) -> Path:
    """A private copy of a checkpoint (for tests that edit its metadata)."""
    shutil.copytree(ck, dest)
    meta = json.loads((dest / "mft_checkpoint.json").read_text())
    (dest / "mft_checkpoint.json").write_text(json.dumps({**meta, **meta_updates}))
    return dest


def train_and_save(base_dir: Path, out_root: Path, method: str, *, use_rslora: bool = False, seed: int = 0,
                   eos_token: str | None = None, chat_format: ChatFormat | None = None,
                   target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """Build the training model, make its trainable weights non-trivial, save a checkpoint in the contract layout.

    Returns:
        (checkpoint_dir, trained MFTModel)
    """
    torch.manual_seed(seed)
    lora = dict(rank=4, alpha=8.0, dropout=0.0, use_rslora=use_rslora,
                target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
    model = build_model(str(base_dir), method=method, lora=None if method == "full" else lora, dtype="fp32")
    with torch.no_grad():
        for name, p in model.hf_model.named_parameters():
            if method == "full" and p.dtype.is_floating_point:
                p.add_(torch.randn_like(p) * 0.02)
            elif "lora_b" in name:
                p.normal_(0.0, 0.05)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    meta = {
        "method": method, "base_model_dir": str(base_dir),
        "chat_format": (chat_format or ChatFormat()).to_dict(),
        "eos_token": eos_token or tokenizer.eos_token, "task_names": TASKS,
        "task_sample_counts": {"code_completion": 1200, "text2sql": 345},
        "valid_losses": {"code_completion": 0.8123, "text2sql": 1.25}, "lora": None if method == "full" else lora,
    }
    if method == "full":
        config = json.loads((base_dir / "config.json").read_text())
        weights = {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}
        path = ckpt.save_checkpoint(out_root, 7, weights=weights, meta=meta, model_config=config,
                                    base_model_dir=base_dir)
    else:
        weights = adapter_to_peft_state_dict(get_adapter_state_dict(model))
        adapter_config = peft_adapter_config(base_dir, lora["rank"], lora["alpha"], lora["dropout"],
                                             lora_target_names(model.hf_model), use_rslora,
                                             lora_target_parameters(model.hf_model))
        path = ckpt.save_checkpoint(out_root, 7, weights=weights, meta=meta, adapter_config=adapter_config)
    return path, model


def reference_merge(base_dir: Path, trained) -> torch.nn.Module:
    """The original float32 base with W + scale * B @ A written in from the trained LoRALinears' own parameters."""
    ref = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, mod in trained.hf_model.named_modules():
            if isinstance(mod, LoRALinear):
                w = ref.get_submodule(name).weight
                w.add_(mod.scaling * (mod.lora_b.weight.float() @ mod.lora_a.weight.float()))
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family,method,rslora", [("qwen2", "lora", True),
                                                  ("llama", "full", False), ("qwen2", "full", False)])
def test_exported_logits_equal_trained(tiny_bases, tmp_path, family, method, rslora):
    base = tiny_bases[family]
    ck, trained = train_and_save(base, tmp_path / "run", method, use_rslora=rslora)
    out = export_checkpoint(ck, tmp_path / "out", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(exported, IDS), logits(trained.hf_model, IDS), atol=2e-5, rtol=1e-5)
    assert (out / "adapter").is_dir() == (method != "full")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(TINY_CONFIGS) - {"llama", "qwen2"}))
def test_lora_export_every_family(tmp_path, smollm2_dir, family):
    """The PEFT module paths of every family's LoRA targets map onto its safetensors keys (fused qkv, MoE, ...)."""
    base = make_tiny_model_dir(tmp_path / "base", family=family, tokenizer_dir=smollm2_dir)
    ck, trained = train_and_save(base, tmp_path / "run", "lora", target_modules="all-linear")
    out = export_checkpoint(ck, tmp_path / "out", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(exported, IDS), logits(trained.hf_model, IDS), atol=2e-5, rtol=1e-5)


def test_qlora_export_merges_onto_original_base(tiny_bases, tmp_path):
    base = tiny_bases["llama"]
    ck, trained = train_and_save(base, tmp_path / "run", "qlora")
    out = export_checkpoint(ck, tmp_path / "out", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = reference_merge(base, trained)
    torch.testing.assert_close(logits(exported, IDS), logits(ref, IDS), atol=2e-5, rtol=1e-5)
    # The merged weight is the ORIGINAL base plus the update, not the NF4 copy: no quantisation error.
    q = trained.hf_model.get_submodule("model.layers.0.self_attn.q_proj")
    with safe_open(base / "model.safetensors", "pt") as f:
        w0 = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    w_out = exported.get_submodule("model.layers.0.self_attn.q_proj").weight
    torch.testing.assert_close(w_out, w0 + q.scaling * q.lora_b.weight @ q.lora_a.weight, atol=1e-6, rtol=0)
    assert (w_out - (q.weight.to(torch.float32) + q.scaling * q.lora_b.weight @ q.lora_a.weight)).abs().max() > 1e-4


def test_peft_adapter_agrees_with_merged_model(tiny_bases, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bases["qwen2"]
    ck, _ = train_and_save(base, tmp_path / "run", "lora", use_rslora=True)
    out = export_checkpoint(ck, tmp_path / "out", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                        out / "adapter")
    torch.testing.assert_close(logits(pm, IDS), logits(merged, IDS), atol=2e-5, rtol=1e-5)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base.resolve())


def test_lora_export_fp32_and_bf16(tiny_bases, llama_lora, tmp_path):
    base = tiny_bases["llama"]
    ck, trained = llama_lora
    f32 = export_checkpoint(ck, tmp_path / "f32", dtype="fp32")
    exported = AutoModelForCausalLM.from_pretrained(f32, dtype=torch.float32)
    torch.testing.assert_close(logits(exported, IDS), logits(trained.hf_model, IDS), atol=2e-5, rtol=1e-5)
    # bf16: the float32 merge cast once, tensor for tensor.
    b16 = export_checkpoint(ck, tmp_path / "b16", dtype="bf16")
    assert json.loads((b16 / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(f32 / "model.safetensors", "pt") as a, safe_open(b16 / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            tb = b.get_tensor(k)
            assert tb.dtype == torch.bfloat16, k
            assert torch.equal(tb, a.get_tensor(k).to(torch.bfloat16)), k
    assert AutoModelForCausalLM.from_pretrained(b16).dtype == torch.bfloat16  # loads with no extra code
    # generation_config stops at the training EOS; the model card says what was trained.
    tok = AutoTokenizer.from_pretrained(base)
    assert json.loads((b16 / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    card = (b16 / "README.md").read_text()
    for needle in (str(base), "LoRA", "code_completion", "1200", "text2sql", "345", "0.8123", "1.2500",
                   "Training steps: 7"):
        assert needle in card, needle


def test_sharded_layout_loads_with_from_pretrained(tiny_bases, tmp_path):
    base = tiny_bases["qwen2"]
    ck, trained = train_and_save(base, tmp_path / "run", "lora")
    max_bytes = 100_000
    out = export_checkpoint(ck, tmp_path / "out", dtype="fp32", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    total, keys = 0, set()
    for f in files:
        with safe_open(out / f, "pt") as st:
            names = list(st.keys())
            sizes = [st.get_tensor(k).numel() * 4 for k in names]
            assert all(index["weight_map"][k] == f for k in names)
            assert sum(sizes) <= max_bytes or len(names) == 1, f  # only an oversized tensor stands alone
            total += sum(sizes)
            keys |= set(names)
    assert keys == set(index["weight_map"]) and total == index["metadata"]["total_size"]
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(exported, IDS), logits(trained.hf_model, IDS), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("chat_format", [
    ChatFormat(),
    ChatFormat(role_markers={"system": "### System:\n", "user": "### Instruction: \"q\"\n",
                             "assistant": "### Response:\n"}, add_bos=True),
])
def test_exported_chat_template_renders_training_prompt(llama_lora, tmp_path, chat_format):
    ck = copy_checkpoint(llama_lora[0], tmp_path / "ck", chat_format=chat_format.to_dict())
    out = export_checkpoint(ck, tmp_path / "out", adapter_only=False)
    tok = AutoTokenizer.from_pretrained(out)
    conversations = [
        [{"role": "user", "content": "Write a SQL query counting rows of `t`."}],
        [{"role": "system", "content": "You are a careful coder.\nBe brief."},
         {"role": "user", "content": "def f(x):"},
         {"role": "assistant", "content": "    return x  # ünïcode, \"quotes\", {{braces}}"},
         {"role": "user", "content": "and now in C?\n"}],
    ]
    for msgs in conversations:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert text == chat_format.render_text(msgs, tok, add_generation_prompt=True)
        if len(msgs) == 1:
            # Token ids too. (For a multi-turn history training tokenises the text in segments cut before each
            # assistant reply, so BPE merges across that cut can differ from tokenising the whole text at once.)
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert list(ids) == chat_format.prompt_ids(msgs, tok)
        # The full conversation renders like training too (assistant turns end with the EOS).
        full = msgs + [{"role": "assistant", "content": "SELECT 1;"}]
        assert tok.apply_chat_template(full, tokenize=False) == chat_format.render_text(full, tok)
    saved = json.loads((out / export.CHAT_FORMAT_FILE).read_text())
    assert ChatFormat.from_config(saved["chat_format"]) == chat_format


def test_adapter_only_writes_just_the_adapter(tiny_bases, llama_lora, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bases["llama"]
    ck, trained = llama_lora
    out = export_checkpoint(ck, tmp_path / "out", adapter_only=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                        out / "adapter")
    torch.testing.assert_close(logits(pm, IDS), logits(trained.hf_model, IDS), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- errors


def test_shape_mismatch_names_tensor_and_both_shapes(llama_lora, tmp_path, smollm2_dir):
    ck = llama_lora[0]
    # Another base: the same family with a different MLP width.
    other = tmp_path / "other"
    cfg = TINY_CONFIGS["llama"](len(AutoTokenizer.from_pretrained(smollm2_dir)))
    cfg.intermediate_size = 96
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    with pytest.raises(ExportError) as e:
        export_checkpoint(ck, tmp_path / "out", base=other)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj.weight" in msg and "(64, 96)" in msg and "(64, 128)" in msg
    assert not (tmp_path / "out").exists()


def test_missing_base_dir(llama_lora, tmp_path):
    with pytest.raises(ExportError, match="base model directory .*nowhere.* does not exist"):
        export_checkpoint(llama_lora[0], tmp_path / "out", base=tmp_path / "nowhere")
    ck = copy_checkpoint(llama_lora[0], tmp_path / "ck", base_model_dir=str(tmp_path / "moved_away"))
    with pytest.raises(ExportError, match=r"moved_away.*mft_checkpoint.json: base_model_dir.*--base"):
        export_checkpoint(ck, tmp_path / "out")


def test_non_empty_output_needs_force(llama_lora, tmp_path):
    ck = copy_checkpoint(llama_lora[0], tmp_path / "run" / "step_7")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    for force in (False, True):  # not an earlier export: never replaced
        with pytest.raises(ExportError, match="did not write .*precious.txt"):
            export_checkpoint(ck, out, force=force)
    assert (out / "precious.txt").read_text() == "keep me"
    # An empty directory is fine without --force; an earlier export is replaced with it only.
    (tmp_path / "empty").mkdir()
    export_checkpoint(ck, tmp_path / "empty", adapter_only=True)
    with pytest.raises(ExportError, match="earlier export and is not empty.*--force"):
        export_checkpoint(ck, tmp_path / "empty")
    export_checkpoint(ck, tmp_path / "empty", force=True)
    assert (tmp_path / "empty" / "config.json").is_file()
    # The checkpoint itself is never a valid output.
    with pytest.raises(ExportError, match="contains the checkpoint"):
        export_checkpoint(ck, ck.parent, force=True)


def test_other_errors(tiny_bases, tmp_path):
    ck_full, _ = train_and_save(tiny_bases["llama"], tmp_path / "full", "full")
    with pytest.raises(ExportError, match="--adapter-only.*full fine-tuning"):
        export_checkpoint(ck_full, tmp_path / "o1", adapter_only=True)
    with pytest.raises(ExportError, match="not an mft training checkpoint"):
        export_checkpoint(tiny_bases["llama"], tmp_path / "o2")
    with pytest.raises(ExportError, match="--dtype"):
        export_checkpoint(ck_full, tmp_path / "o3", dtype="int8")
    with pytest.raises(ExportError, match="--max-shard-size"):
        export_checkpoint(ck_full, tmp_path / "o4", max_shard_size="lots")


def test_parse_size():
    assert shards.parse_size("5GB") == 5 * 10**9
    assert shards.parse_size("500MiB") == 500 * 2**20
    assert shards.parse_size("1.5kb") == 1500
    assert shards.parse_size(1234) == 1234


def test_cli_run(llama_lora, tmp_path, capsys):
    ck = llama_lora[0]
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    out = tmp_path / "out"
    assert export.run(parser.parse_args([str(ck), "--output", str(out), "--dtype", "fp16"])) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert export.run(parser.parse_args([str(ck), "--output", str(out)])) == 2
    assert "not empty" in capsys.readouterr().err


def test_export_of_a_run_directory_takes_its_newest_checkpoint(llama_lora, tmp_path, capsys):
    run = tmp_path / "my_run"
    newest = shutil.copytree(llama_lora[0], run / "step_7")
    older = copy_checkpoint(llama_lora[0], run / "step_3", step=3)
    (older / "adapter_model.safetensors").write_bytes(b"damaged: exporting it would fail")
    (run / "step_9").mkdir()  # a save that never finished: no mft_checkpoint.json
    assert run_export_cli(run, "--output", tmp_path / "from_run") == 0
    assert "the newest checkpoint in" in capsys.readouterr().out
    assert run_export_cli(newest, "--output", tmp_path / "from_step") == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "from_run" / name).read_bytes() == (tmp_path / "from_step" / name).read_bytes()
    assert run_export_cli(tmp_path / "from_step", "--output", tmp_path / "x") == 2
    assert "is neither a training checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------- PEFT adapters from elsewhere


def peft_adapter(base_dir: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """An adapter trained elsewhere, as `peft` saves it: random non-zero B, and every other trainable tensor
    (biases with bias=lora_only, modules_to_save copies) perturbed."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                                   **lora_kwargs}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


def run_export_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    export.add_arguments(parser)
    return export.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, smollm2_dir):
    """GPT-2: Conv1D layers store weights as [in, out], so its LoRA adapters are fan_in_fan_out."""
    import transformers

    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(2)
    cfg = transformers.GPT2Config(vocab_size=len(AutoTokenizer.from_pretrained(smollm2_dir)), n_embd=64, n_layer=2,
                                  n_head=4, n_positions=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["qwen2 MFTCoder's LoraConfig", "llama rslora + modules_to_save", "gpt2 Conv1D"])
def test_peft_adapter_merged_gives_peft_logits(tiny_bases, tiny_gpt2, tmp_path, case):
    peft = pytest.importorskip("peft")
    base, kwargs = {
        # MFTCoder: all linear layers, bias="lora_only" (it trains the biases of adapted layers: Qwen2's q/k/v)
        "qwen2 MFTCoder's LoraConfig": (tiny_bases["qwen2"], {"bias": "lora_only", "lora_dropout": 0.05}),
        "llama rslora + modules_to_save": (tiny_bases["llama"], {"use_rslora": True, "modules_to_save": ["lm_head"],
                                                                 "target_modules": ["q_proj", "v_proj", "down_proj"]}),
        "gpt2 Conv1D": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    }[case]
    adapter = peft_adapter(base, tmp_path / "adapter", **kwargs)
    assert run_export_cli("--adapter", adapter, "--base", base, "--output", tmp_path / "out") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                               adapter).eval()
    torch.testing.assert_close(logits(merged, IDS), logits(reference, IDS), atol=2e-5, rtol=1e-5)
    assert logits(merged, IDS).sub(logits(AutoModelForCausalLM.from_pretrained(base), IDS)).abs().max() > 1e-3
    # The base is fp32: so is the export, by default. The chat template is MFTCoder's format.
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "<s>human\nhi\n<s>bot\n"
    assert "merged onto its base with `mft export --adapter`" in (tmp_path / "out" / "README.md").read_text()
    # `mft generate --model BASE --adapter ADAPTER` merges the same adapter the same way (biases, modules_to_save
    # copies and Conv1D's [in, out] layout included).
    from mft_components.inference.generate import load_generation_model

    gm = load_generation_model(base, adapter=adapter, default_chat_format={"template": "mft"})
    torch.testing.assert_close(logits(gm.model, IDS), logits(reference, IDS), atol=2e-5, rtol=1e-5)


def test_a_saved_copy_of_a_tied_output_layer_is_refused(tiny_bases, tmp_path, capsys):
    """qwen2's lm_head is its embedding: an adapter's own lm_head copy (modules_to_save) cannot be merged into one
    tensor without replacing the embedding too; export and generate both refuse it, naming the tensor."""
    pytest.importorskip("peft")
    from mft_components.inference.generate import GenerateError, load_generation_model

    adapter = peft_adapter(tiny_bases["qwen2"], tmp_path / "adapter", modules_to_save=["lm_head"],
                           target_modules=["q_proj"])
    assert run_export_cli("--adapter", adapter, "--base", tiny_bases["qwen2"], "--output", tmp_path / "out") == 2
    assert "the adapter holds lm_head.weight" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(GenerateError, match="holds its own lm_head.weight, which this model ties to "
                                            "model.embed_tokens.weight"):
        load_generation_model(tiny_bases["qwen2"], adapter=adapter, default_chat_format={"template": "mft"})


def test_dtype_auto_keeps_the_base_dtype(tiny_bases, llama_lora, tmp_path):
    ck, trained = llama_lora
    f32 = export_checkpoint(ck, tmp_path / "f32")  # the tiny base is fp32
    with safe_open(f32 / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(f32), IDS), logits(trained.hf_model, IDS),
                               atol=2e-5, rtol=1e-5)
    bf16_base = tmp_path / "bf16_base"
    AutoModelForCausalLM.from_pretrained(tiny_bases["llama"], dtype=torch.bfloat16).save_pretrained(bf16_base)
    AutoTokenizer.from_pretrained(tiny_bases["llama"]).save_pretrained(bf16_base)
    b16 = export_checkpoint(ck, tmp_path / "b16", base=bf16_base)
    assert json.loads((b16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(b16).dtype == torch.bfloat16


def test_unmergeable_adapters_are_refused_naming_the_option(tiny_bases, tmp_path, capsys):
    base = tiny_bases["llama"]
    dora = peft_adapter(base, tmp_path / "dora", use_dora=True, target_modules=["q_proj"])
    assert run_export_cli("--adapter", dora, "--base", base, "--output", tmp_path / "o") == 2
    assert "use_dora: True is not supported by the merge (DoRA" in capsys.readouterr().err
    plain = peft_adapter(base, tmp_path / "plain", target_modules=["q_proj"])
    for key, value, words in [("init_lora_weights", "pissa", "rewrites the base weights"),
                              ("peft_type", "IA3", "peft_type: 'IA3'"),
                              ("rank_pattern", {"q_proj": 8}, "per-module ranks")]:
        edited = tmp_path / f"edited_{key}"
        shutil.copytree(plain, edited)
        cfg = json.loads((edited / "adapter_config.json").read_text())
        (edited / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ExportError, match=words):
            export.export_adapter(edited, base, tmp_path / "o")
    damaged = tmp_path / "damaged_chat_format"
    shutil.copytree(plain, damaged)
    (damaged / export.CHAT_FORMAT_FILE).write_text('{"chat_format": ')
    with pytest.raises(ExportError, match=f"{damaged / export.CHAT_FORMAT_FILE}: not valid JSON"):
        export.export_adapter(damaged, base, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert run_export_cli("--adapter", plain, "--output", tmp_path / "o") == 2
    assert "--adapter needs --base" in capsys.readouterr().err
    assert run_export_cli("--base", base, "--output", tmp_path / "o") == 2
    assert "either a CHECKPOINT_DIR or --adapter" in capsys.readouterr().err


def _tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file and directory under root (not under `skip`): relative path -> (size, mtime_ns) of files."""
    out = {}
    for p in sorted(root.rglob("*")):
        if any(p == s or s in p.parents for s in skip):
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if p.is_file() else "dir"
    return out


def _mft(*args: str) -> int:
    import cli

    return cli.main(list(map(str, args)))


def test_export_never_deletes_what_it_did_not_write(llama_lora, tiny_bases, tmp_path, monkeypatch, capsys):
    """`mft export --output . --force` (and `..`, the tokenizer, the data, the base) is refused; --force replaces
    only an earlier export, swapping the new one in only when it is complete; leftovers of killed exports (and
    only those) are removed; directories get the umask's mode, not 0700."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "sub" / "keep.txt").write_text("mine too")
    data = work / "data" / "task_a"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    tok = work / "tokenizer"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_bases["llama"] / name).is_file():
            shutil.copy(tiny_bases["llama"] / name, tok / name)
    ck = copy_checkpoint(llama_lora[0], tmp_path / "run" / "step_7",
                         config={"data": {"data_paths": [str(data)]}, "tokenizer": {"path": str(tok)}})
    before = _tree(tmp_path)

    monkeypatch.chdir(work / "sub")
    refusals = {
        ".": "is the current directory", "..": "contains the current directory", str(tok): "is the tokenizer",
        str(work / "data"): "contains the training data", str(tiny_bases["llama"]): "is the base model",
        str(ck.parent): "contains the checkpoint",
        str(ck / "exported"): "is inside the checkpoint",  # pruned or renamed with it by a later run
    }
    for output, why in refusals.items():
        assert _mft("export", ck, "--output", output, "--force") == 2
        assert why in capsys.readouterr().err, output
    monkeypatch.chdir(work)
    assert _mft("export", ck, "--output", "sub", "--force") == 2  # not an earlier export: never replaced
    assert "did not write (e.g. keep.txt)" in capsys.readouterr().err
    (work / "empty").mkdir()
    monkeypatch.chdir(work / "empty")
    assert _mft("export", ck, "--output", ".") == 2
    assert "is the current directory" in capsys.readouterr().err
    monkeypatch.chdir(work)
    (work / "empty").rmdir()
    assert _tree(tmp_path) == before  # nothing was touched

    # Leftovers: a killed export's marked sibling goes, a look-alike without the marker stays.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = work / ".out.mft-export-tmp-x1y2"
    killed.mkdir()
    (killed / ".mft-export-partial").write_text(dead.stdout)
    (killed / "model.safetensors").write_bytes(b"0" * 1000)
    foreign = work / ".out.tmp-notmine"
    foreign.mkdir()
    old_umask = os.umask(0o022)
    try:
        assert _mft("export", ck, "--output", work / "out") == 0
    finally:
        os.umask(old_umask)
    assert not killed.exists() and foreign.is_dir() and ".out.mft-export-tmp-x1y2" in capsys.readouterr().err
    out = work / "out"
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert oct((out / "adapter").stat().st_mode & 0o777) == "0o755"

    # A failing export onto an earlier one (a NaN adapter, found after writing began) leaves it as it was.
    exported = _tree(out)
    weights = ckpt.load_checkpoint_weights(ck)
    weights[next(iter(weights))][0, 0] = float("nan")
    meta = {k: v for k, v in json.loads((ck / "mft_checkpoint.json").read_text()).items() if k != "files"}
    nan_ck = ckpt.save_checkpoint(tmp_path / "nan_run", 7, weights=weights, meta=meta,
                                  adapter_config=json.loads((ck / "adapter_config.json").read_text()))
    assert _mft("export", nan_ck, "--output", out, "--force") == 2
    assert "NaN/inf" in capsys.readouterr().err
    assert _tree(out) == exported and not list(work.glob(".out.mft-export-*"))
    assert _mft("export", ck, "--output", out, "--force") == 0  # an earlier export is replaced
    assert (out / "config.json").is_file() and not list(work.glob(".out.mft-export-*"))
    assert (out / "adapter").is_dir() and not (out / ".mft-export-partial").exists()

    # Killed between the swap's two renames: the earlier export sits in a marked `old` sibling, the new one in a
    # marked `tmp` sibling. The next export puts the earlier one back (and then wants --force to replace it).
    exported = _tree(out)
    aside = work / ".out.mft-export-old-k1"
    aside.mkdir()
    (aside / ".mft-export-partial").write_text(dead.stdout)
    os.replace(out, aside / "previous")
    unswapped = work / ".out.mft-export-tmp-k1"
    shutil.copytree(aside / "previous", unswapped)
    (unswapped / ".mft-export-partial").write_text(dead.stdout)
    assert _mft("export", ck, "--output", out) == 2
    assert "holds an earlier export" in capsys.readouterr().err
    assert _tree(out) == exported and not list(work.glob(".out.mft-export-*"))
    assert _tree(tmp_path, skip=(out, foreign, tmp_path / "nan_run")) == before


def test_corrupted_adapter_fails_naming_the_file(llama_lora, tmp_path, capsys):
    """A bit flip is caught by the checkpoint's consistency record; NaN / inf weights saved as such by the
    reader of the adapter; truncated, garbage or empty files by either. Each names the file; nothing is written."""
    ck = llama_lora[0]
    cases = {}
    flipped = copy_checkpoint(ck, tmp_path / "flip" / "step_7")
    raw = bytearray((flipped / "adapter_model.safetensors").read_bytes())
    raw[-5] ^= 0x10  # one bit of the last tensor's data: still a valid file, silently other weights
    (flipped / "adapter_model.safetensors").write_bytes(raw)
    cases[flipped] = "adapter_model.safetensors: its content differs from the record"
    meta = {k: v for k, v in json.loads((ck / "mft_checkpoint.json").read_text()).items() if k != "files"}
    for bad in (float("nan"), float("inf")):
        weights = ckpt.load_checkpoint_weights(ck)
        weights[sorted(weights)[3]][1, 2] = bad
        saved = ckpt.save_checkpoint(tmp_path / f"{bad}", 7, weights=weights, meta=meta,
                                     adapter_config=json.loads((ck / "adapter_config.json").read_text()))
        cases[saved] = f"adapter_model.safetensors: tensor {sorted(weights)[3]} holds 1 NaN/inf value"
    for name in ("adapter_model.safetensors", "adapter_config.json", "mft_checkpoint.json"):
        for damage, content in (("truncated", None), ("garbage", b"\x8f\x00garbage" * 10), ("empty", b"")):
            copy = copy_checkpoint(ck, tmp_path / f"{name}-{damage}" / "step_7")
            full = (copy / name).read_bytes()
            (copy / name).write_bytes(full[: len(full) // 2] if content is None else content)
            cases[copy] = name
    for case, expected in cases.items():
        before = _tree(tmp_path)
        assert _mft("export", case, "--output", tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert expected in err and str(case) in err, (case, err)
        assert _tree(tmp_path) == before
