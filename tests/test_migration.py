"""What a user migrating from MFTCoder meets, through the `mft` command: the exported tokenizer gives the training
ids (SentencePiece `legacy: true` included), the exported chat template takes MFTCoder's role names, hidden files
are not tasks' data, older `adapter_model.bin` adapters load, and `mft import mftcoder` maps v0.4's keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import cli
from mft_components.data.templates import ChatFormat
from mft_components.inference import tokenizer_files
from tests.test_data import conv, data_config, write_jsonl
from tests.test_export import train_and_save
from tests.tiny_models import make_sentencepiece_tokenizer, make_tiny_model_dir

CONVERSATION = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "hello world"},
                {"role": "assistant", "content": "def function(): return value"},
                {"role": "user", "content": "print the list of numbers"}]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, smollm2_dir):
    """The tokenizer families the tests use: SmolLM2's byte-level BPE and a SentencePiece Llama `legacy: true`."""
    return {"smollm2": smollm2_dir,
            "sentencepiece legacy": make_sentencepiece_tokenizer(tmp_path_factory.mktemp("spm") / "tok")}


@pytest.fixture(scope="module")
def lora_checkpoints(tokenizer_dirs, tmp_path_factory):
    out = {}
    for family, tok_dir in tokenizer_dirs.items():
        root = tmp_path_factory.mktemp(family.replace(" ", "_"))
        base = make_tiny_model_dir(root / "base", "llama", vocab_size=len(AutoTokenizer.from_pretrained(tok_dir)),
                                   tokenizer_dir=tok_dir)
        out[family] = train_and_save(base, root / "run", "lora")[0]
    return out


@pytest.mark.parametrize("family", ["sentencepiece legacy", "smollm2"])
def test_exported_tokenizer_gives_the_training_ids(lora_checkpoints, tokenizer_dirs, tmp_path, capsys, family):
    out = tmp_path / "export"
    assert cli.main(["export", str(lora_checkpoints[family]), "--output", str(out)]) == 0, capsys.readouterr().err
    trained = AutoTokenizer.from_pretrained(tokenizer_dirs[family])
    exported = AutoTokenizer.from_pretrained(out)
    fmt = ChatFormat()
    want = fmt.prompt_ids(CONVERSATION, trained)
    if family == "sentencepiece legacy":  # the case transformers 5's save_pretrained broke: ▁human after <s>
        assert "▁bot" in trained.convert_ids_to_tokens(want)
    assert fmt.prompt_ids(CONVERSATION, exported) == want  # what `mft generate` on the export feeds the model
    # A chat_template consumer tokenises the whole text: the training ids for a first turn. (In a longer history
    # training tokenises each assistant reply on its own, as MFTCoder does, and SentencePiece puts a "▁" there.)
    first_turn = CONVERSATION[:2]
    assert (exported.apply_chat_template(first_turn, add_generation_prompt=True, tokenize=True, return_dict=False)
            == fmt.prompt_ids(first_turn, trained))
    # MFTCoder's role names render the same prompt as transformers' (CodeFuse models ship templates taking both).
    mftcoder_roles = [{**m, "role": {"user": "human", "assistant": "bot"}.get(m["role"], m["role"])}
                      for m in CONVERSATION]
    assert (exported.apply_chat_template(mftcoder_roles, add_generation_prompt=True, tokenize=False)
            == exported.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False))


def test_export_stops_when_the_saved_tokenizer_tokenises_differently(lora_checkpoints, tmp_path, capsys,
                                                                     monkeypatch):
    # Without writing `legacy: true` back, transformers 5 saves a tokenizer that splits "<s>human" as "h", "uman":
    # the check on the saved copy must catch it and say so, leaving no export behind.
    monkeypatch.setattr(tokenizer_files, "TOKENISATION_KEYS", ())
    out = tmp_path / "export"
    assert cli.main(["export", str(lora_checkpoints["sentencepiece legacy"]), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tokenises differently from the training tokenizer" in err and "'▁bot'" in err, err
    assert not out.exists()


def test_hidden_files_are_skipped_and_a_linked_task_keeps_the_links_name(smollm2_dir, tmp_path, capsys):
    """MFTCoder's glob skips hidden files: a migrated tree with Jupyter's checkpoints trains no duplicates."""
    real = tmp_path / "downloaded_v2"
    write_jsonl(real / "train.jsonl", [conv(0), conv(1)])
    write_jsonl(real / ".ipynb_checkpoints" / "train-checkpoint.jsonl", [conv(0), conv(1)])
    write_jsonl(real / ".backup.jsonl", [conv(2)])
    write_jsonl(real / "sub" / ".old" / "x.jsonl", [conv(3)])
    (tmp_path / "code_repair").symlink_to(real, target_is_directory=True)
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "code_repair"])
    assert cli.main(["data", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^code_repair\s+2\s+0\s+2\s", out, re.M), out  # named after the link; 2 records, not 6
    assert (f"data.data_paths[0]: {tmp_path / 'code_repair'}: skipped 3 hidden file(s) and director(ies) "
            f"(.backup.jsonl, .ipynb_checkpoints/, .old/), as MFTCoder does") in out


@pytest.mark.slow
def test_older_bin_adapter_merges_and_generates_with_a_template(tmp_path, smollm2_dir, capsys):
    """MFTCoder's adapters were saved by older peft as adapter_model.bin: `mft export --adapter` merges one (read
    with torch.load(weights_only=True)) to peft's logits, and `mft generate --adapter --template` prompts with it."""
    peft = pytest.importorskip("peft")
    vocab = len(AutoTokenizer.from_pretrained(smollm2_dir))
    base = make_tiny_model_dir(tmp_path / "base", "qwen2", vocab_size=vocab, tokenizer_dir=smollm2_dir, seed=3)
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    adapter = tmp_path / "mftcoder_adapter"
    model.save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()

    assert cli.main(["export", "--adapter", str(adapter), "--base", str(base), "--output",
                     str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    ids = torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits, atol=2e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "adapter" / "adapter_model.safetensors").is_file()

    generate = ["generate", "--model", str(base), "--adapter", str(adapter), "--prompt", "hi", "--greedy",
                "--max-new-tokens", "2"]
    assert cli.main(generate) == 2
    assert "pass --template mft" in capsys.readouterr().err
    assert cli.main(generate + ["--template", "mft"]) == 0, capsys.readouterr().err


def test_a_bin_adapter_that_needs_code_to_load_is_refused(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(4, 8), "payload": Path("/")},
               adapter / "adapter_model.bin")
    make_tiny_model_dir(tmp_path / "base", "llama", vocab_size=64)
    assert cli.main(["export", "--adapter", str(adapter), "--base", str(tmp_path / "base"), "--output",
                     str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{adapter / 'adapter_model.bin'}: not a readable PyTorch weights file (UnpicklingError" in err, err


def test_text_records_train_text_newline_eos_as_mftcoder(smollm2_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "pretrain" / "a.jsonl", [{"text": "def raw():\n    pass"}])
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "pretrain"])
    assert cli.main(["data", "--config", str(config), "--show", "1", "--color", "never"]) == 0
    assert "[[def raw():\n    pass\n<|im_end|>]]" in capsys.readouterr().out


# MFTCoder v0.4's selfpaced_train_config.json (its self-paced loss became CoBa in v0.5), paths filled in.
SELFPACED_V04 = {
    "data_paths": "[data/a,data/b]", "output_dir": "out", "tb_dir": "tb", "pretrained_model_path": "model",
    "model_type": "llama", "load_raw_dataset": True, "data_split": "98,2,0", "padding_mode": "padding",
    "use_dynamic_padding": True, "tokenize_mode": "sft", "tokenizer_type": "AutoTokenizer",
    "weighted_loss_mode": "selfpaced", "selfpaced_interval": 3, "selfpaced_history_length": 100,
    "selfpaced_sample_valid_num": 2, "selfpaced_scale_factor": 50, "attn_implementation": "flash_attention_2",
    "seq_length": 4096, "seed": 1234, "peft_type": "qlora", "quantization": "4bit", "lora_rank": 96,
    "lora_alpha": 32, "lora_dropout": 0.05, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
    "learning_rate": 5e-5, "min_lr": 5e-6, "weight_decay": 0.1, "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine", "num_warmup_steps": 300, "num_train_epochs": 4, "resume_from_checkpoint": None,
    "log_interval": 10, "checkpointing_steps": 100, "evaluation_steps": 100, "max_train_steps": None,
    "epoch_checkpointing": True, "shuffle_before_split": True, "early_stopping": True, "early_stopping_stall_num": 5,
    "saving_limit": None,
}


def test_import_maps_v04_selfpaced_keys_to_their_coba_successors(tmp_path, capsys):
    import yaml

    src = tmp_path / "selfpaced_train_config.json"
    src.write_text(json.dumps(SELFPACED_V04, indent=4))
    out = tmp_path / "run.yaml"
    assert cli.main(["import", "mftcoder", str(src), "-o", str(out)]) == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    loss = yaml.safe_load(out.read_text())["loss"]
    assert (loss["mode"], loss["coba_update_interval"], loss["coba_history_length"],
            loss["coba_sample_valid_num"]) == ("coba", 3, 100, 2)
    assert "selfpaced_interval: MFTCoder v0.4's name of coba_update_interval" in report
    assert "selfpaced_scale_factor: v0.4's softmax scale of the self-paced weights has no successor" in report
    assert "did you mean" not in report
