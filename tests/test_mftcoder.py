"""`mft import mftcoder`: MFTCoder train configs become mft configs that validate and train.

The MFTCoder configs here are written in MFTCoder's format (the keys of its `MftTrainArgs`, lists as
"[a,b]" strings); a tiny Llama with SmolLM2's tokenizer trains on two small tasks for two steps per config.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import cli
from mft_components.interop import mftcoder
from mft_components.config import check_config, load_config
from mft_components.recipe_config.schema import RecipeConfig
from tests.tiny_models import make_tiny_model_dir

# MftTrainArgs of MFTCoder v0.5, as issue 15 lists them: every one must be translated or reported.
MFTTRAINARGS = (
    "data_paths output_dir tb_dir pretrained_model_path model_type load_raw_dataset task_weights data_weights "
    "data_split padding_mode use_dynamic_padding tokenize_mode weighted_loss_mode coba_warmup_steps "
    "coba_history_length coba_tau coba_update_interval coba_sample_valid_num peft_type quantization lora_rank "
    "lora_alpha lora_dropout target_modules per_device_train_batch_size per_device_eval_batch_size tokenizer_type "
    "learning_rate min_lr weight_decay gradient_accumulation_steps lr_scheduler_type num_warmup_steps "
    "num_train_epochs max_train_steps seed seq_length resume_from_checkpoint auto_resume log_interval "
    "checkpointing_steps evaluation_steps epoch_checkpointing shuffle_before_split use_random_sampler "
    "early_stopping early_stopping_stall_num saving_limit attn_implementation role_markers distributed_type "
    "trust_remote_code low_cpu_mem_usage init_timeout_seconds use_xformers weight_by_num_documents "
    "make_vocab_size_divisible_by model_parallel_size use_slow_tokenizer world_size"
).split()

# A LoRA config as MFTCoder ships them: placeholders for the paths, everything else set.
SHIPPED_STYLE = {
    "data_paths": "$DATA_PATHS", "output_dir": "$OUTPUT_DIR", "tb_dir": "$TensorBoard_DIR",
    "pretrained_model_path": "$MODEL_NAME_OR_PATH", "model_type": "$MODEL_TYPE", "load_raw_dataset": True,
    "data_split": "98,2,0", "padding_mode": "padding", "use_dynamic_padding": True, "tokenize_mode": "sft",
    "tokenizer_type": "AutoTokenizer", "weighted_loss_mode": "case3", "attn_implementation": "flash_attention_2",
    "seq_length": 4096, "seed": 1234, "peft_type": "lora", "quantization": None, "lora_rank": 96, "lora_alpha": 32,
    "lora_dropout": 0.05, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
    "learning_rate": 5e-5, "min_lr": 5e-6, "weight_decay": 0.1, "gradient_accumulation_steps": 1,
    "lr_scheduler_type": "cosine", "num_warmup_steps": 300, "num_train_epochs": 4, "resume_from_checkpoint": None,
    "log_interval": 10, "checkpointing_steps": 100, "evaluation_steps": 100, "max_train_steps": None,
    "epoch_checkpointing": True, "shuffle_before_split": True, "early_stopping": True,
    "early_stopping_stall_num": 5, "saving_limit": None,
}


def write_json(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg, indent=4))
    return path


def test_every_mfttrainargs_key_is_in_the_table():
    assert sorted(mftcoder.MFTCODER_KEYS) == sorted(MFTTRAINARGS)


def test_shipped_style_config_reports_placeholders_and_every_key(tmp_path, capsys):
    src = write_json(tmp_path / "lora_train_config.json", {**SHIPPED_STYLE, "quantization": "8bit"})
    out = tmp_path / "lora.yaml"
    assert cli.main(["import", "mftcoder", str(src), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    result, text = mftcoder.import_mftcoder(src)
    # Every MftTrainArgs key is either behind an mft key or listed with the reason it is not written.
    used = {k for sources in result.sources.values() for k in sources.split(", ")}
    dropped = dict(result.dropped)
    assert used | set(dropped) == set(MFTTRAINARGS) and not used & set(dropped)
    assert "8bit has no counterpart" in dropped["quantization"] and "quantization: " in printed
    # The three placeholders that need a value are reported; $MODEL_TYPE and $TensorBoard_DIR need none.
    assert [(k, t) for k, t, _ in result.fill_in] == [
        ("data_paths", "data.data_paths"), ("output_dir", "output_dir"), ("pretrained_model_path", "model.model_dir")]
    assert "3 value(s) to fill in" in printed and "$MODEL_NAME_OR_PATH" in printed
    assert out.read_text() == text and "data_paths: [$DATA_PATHS]  # data_paths; <- FILL IN" in text
    # MFTCoder's process-group timeout (its default, 3600 s: the key is absent) is mft's collective timeout.
    assert "distributed_timeout_s: 3600  # init_timeout_seconds" in text
    # `mft validate` accepts every key and points at exactly the two paths still to fill in.
    problems = check_config(load_config(out), RecipeConfig)
    assert len(problems) == 2 and all("path does not exist: $" in p for p in problems), problems
    assert cli.main(["import", "mftcoder", str(src), "-o", str(out)]) == 1  # no clobbering without --force
    assert "--force" in capsys.readouterr().err


@pytest.fixture(scope="module")
def assets(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("mftcoder")
    model = make_tiny_model_dir(root / "model", family="llama", tokenizer_dir=smollm2_dir)
    rng = random.Random(0)
    paths = []
    for task in ("add", "shout"):
        lines = []
        for _ in range(24):
            a, b, w = rng.randint(0, 9), rng.randint(0, 9), rng.choice(["cat", "dog", "fish"])
            lines.append({"chat_rounds": [{"role": "human", "content": f"{a}+{b}="},
                                          {"role": "bot", "content": str(a + b)}]} if task == "add"
                         else {"instruction": f"shout {w}", "response": w.upper() + "!"})
        (root / task).mkdir()
        (root / task / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        paths.append(str(root / task))
    return {"model": str(model), "data_paths": "[" + ",".join(paths) + "]"}


# Representative MFTCoder configs: (name, keys over a common base, mft values the import must produce)
CASES = {
    "lora_padding_case3": ({"peft_type": "lora", "padding_mode": "padding", "weighted_loss_mode": "case3",
                            "task_weights": "[1.0,3.0]", "num_warmup_steps": 1, "gradient_accumulation_steps": 2},
                           {"model.method": "lora", "data.packing": "padding", "loss.mode": "task",
                            "loss.task_weights": [1.0, 3.0], "lr_scheduler.warmup_steps": 2,
                            "model.lora.target_modules": "all-linear"}),
    "qlora_pack_case4": ({"peft_type": "qlora", "quantization": "4bit", "padding_mode": "pack",
                          "weighted_loss_mode": "case4", "target_modules": ["q_proj", "v_proj"]},
                         {"model.method": "qlora", "data.packing": "pack", "loss.mode": "task_sample",
                          "model.lora.target_modules": ["q_proj", "v_proj"]}),
    "full_padding_case1": ({"peft_type": None, "padding_mode": "padding", "weighted_loss_mode": "case1",
                            "learning_rate": 1e-3},
                           {"model.method": "full", "loss.mode": "token", "saving_limit": 2}),
    "coba_pack": ({"peft_type": "lora", "padding_mode": "pack", "weighted_loss_mode": "coba",
                   "task_weights": "[1,2]", "coba_warmup_steps": 1, "coba_history_length": 4,
                   "coba_update_interval": 1, "coba_sample_valid_num": 1, "coba_tau": 5},
                  {"loss.mode": "coba", "loss.coba_warmup_steps": 1, "loss.coba_history_length": 4}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_imported_config_validates_and_trains(assets, tmp_path, name):
    keys, expected = CASES[name]
    src = write_json(tmp_path / f"{name}.json", {
        "data_paths": assets["data_paths"], "output_dir": str(tmp_path / "out"), "tb_dir": str(tmp_path / "tb"),
        "pretrained_model_path": assets["model"], "model_type": "llama", "data_split": "80,20,0",
        "seq_length": 64, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
        "learning_rate": 1e-2, "min_lr": 1e-4, "num_warmup_steps": 1, "num_train_epochs": 1, "max_train_steps": 2,
        "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "log_interval": 1, "checkpointing_steps": 2,
        "evaluation_steps": 2, "early_stopping": True, "early_stopping_stall_num": 2, "seed": 7, **keys})
    out = tmp_path / f"{name}.yaml"
    assert cli.main(["import", "mftcoder", str(src), "-o", str(out)]) == 0
    cfg = load_config(out)
    for dotted, value in {"data.seq_len": 64, "data.valid_ratio": 0.2, "optimizer.lr": keys.get("learning_rate", 1e-2),
                          "model.attn_implementation": "auto", "max_steps": 2, "micro_batch_size": 2, "early_stopping_patience": 2, **expected}.items():
        node = cfg
        for part in dotted.split("."):
            node = node[part]
        assert (node if not hasattr(node, "_content") else list(node)) == value, dotted
    assert check_config(cfg, RecipeConfig) == []
    recipe = "full_finetune_distributed" if keys["peft_type"] is None else "lora_finetune_distributed"
    assert cli.main(["validate", "--config", str(out), "--recipe", recipe]) == 0
    # Two steps on the CPU: attention auto (sdpa_varlen here), fp32, the tokenisation cache in tmp.
    assert cli.main(["run", recipe, "--config", str(out), "dtype=fp32",
                     "model.activation_checkpointing=false", f"data.cache_dir={tmp_path / 'cache'}",
                     "data.num_workers=0", "tensorboard=false"]) == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["loss"] > 0 for r in train)
    assert (tmp_path / "out" / "step_2").is_dir()
    if expected.get("loss.mode") == "coba":  # past its warmup, CoBa moved the weights off uniform
        weights = torch.load(tmp_path / "out" / "step_2" / "recipe_state.pt", weights_only=True)["loss"]["coba"]
        assert sum(weights["weights"]) == pytest.approx(1) and weights["weights"][0] != pytest.approx(0.5)


BAD = [  # (key, value, words of the error)
    ("padding_mode", "concat", "padding_mode: 'concat'"),
    ("weighted_loss_mode", "case9", "weighted_loss_mode: 'case9'; expected one of case1"),
    ("task_weights", "[1,2,3]", "task_weights: 3 weights for 2 data_paths"),
    ("task_weights", "[a,b]", "task_weights: '[a,b]' is not a list of numbers"),
    ("data_split", "x,y", "data_split: 'x,y' is not a split"),
    ("data_split", "0,100,0", "data_split: the train share 0 must be in (0, 100]"),
    ("peft_type", "prefix", "peft_type: 'prefix'; expected 'lora', 'qlora' or null"),
    ("lora_rank", "96", "lora_rank: expected int, got '96'"),
    ("load_raw_dataset", False, "load_raw_dataset: false reads MFTCoder's offline-tokenised"),
    ("tokenize_mode", "pretrain", "tokenize_mode: 'pretrain'"),
    ("lora_rnk", 8, "lora_rnk: not an MftTrainArgs key (MFTCoder v0.5's mft_accelerate.py would refuse it too); did you mean "
                           "'lora_rank'?"),
    ("role_markers", {"bot": "B:"}, "role_markers: {'bot': 'B:'}; expected non-empty strings"),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_values_are_errors_naming_the_key(tmp_path, capsys, key, value, words):
    src = write_json(tmp_path / "c.json", {"data_paths": "[a,b]", "output_dir": "o", "tb_dir": "t",
                                           "pretrained_model_path": "m", "model_type": "llama", key: value})
    assert cli.main(["import", "mftcoder", str(src), "-o", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mft import: error: {src}") and words in err and "Traceback" not in err, err
    assert not (tmp_path / "c.yaml").exists()


def test_bad_files(tmp_path, capsys):
    (tmp_path / "broken.json").write_text('{"data_paths": "[a]",\n "output_dir": }')
    assert cli.main(["import", "mftcoder", str(tmp_path / "broken.json")]) == 1
    assert f"{tmp_path / 'broken.json'}:2:" in capsys.readouterr().err
    assert cli.main(["import", "mftcoder", str(tmp_path / "missing.json")]) == 1
    assert "no such file" in capsys.readouterr().err
    # MFTCoder's own command-line overrides fill what the file leaves out, and print the config without -o.
    src = write_json(tmp_path / "min.json", {"output_dir": "o"})
    assert cli.main(["import", "mftcoder", str(src), "--data_paths", "[x,y]", "--pretrained_model_path", "m",
                     "--micro_batch_size", "3"]) == 0
    printed = capsys.readouterr()
    assert "data_paths: [x, y]" in printed.out and "micro_batch_size: 3" in printed.out
    assert "wrote the config to stdout" in printed.err


def test_migration_page_lists_every_key():
    page = (Path(__file__).resolve().parent.parent / "docs" / "migrating-from-mftcoder.md").read_text()
    table = "\n".join(line.split("|")[1] for line in page.splitlines() if line.startswith("| `"))
    assert [k for k in MFTTRAINARGS if f"`{k}`" not in table] == []


@pytest.mark.parametrize("schedule,warmup", [("constant", 0), ("constant_with_warmup", 6), ("cosine", 6)])
def test_warmup_follows_mftcoder_schedule(tmp_path, schedule, warmup):
    # transformers' get_scheduler("constant") ignores num_warmup_steps: MFTCoder ran no warmup there.
    src = write_json(tmp_path / "c.json", {"data_paths": "[a,b]", "output_dir": "o", "pretrained_model_path": "m",
                                           "lr_scheduler_type": schedule, "num_warmup_steps": 3,
                                           "gradient_accumulation_steps": 2, "learning_rate": 1e-4})
    result, _ = mftcoder.import_mftcoder(src)
    assert result.config["lr_scheduler"]["warmup_steps"] == warmup
    if schedule != "cosine":
        assert result.config["lr_scheduler"]["min_lr"] == 1e-4


@pytest.mark.parametrize("peft_type,limit,expected", [("lora", 0, None), ("lora", None, None), ("lora", 3, 3),
                                                       (None, 0, 2), (None, None, 2), (None, 3, 3)])
def test_saving_limit_below_one_is_mftcoders_default(tmp_path, peft_type, limit, expected):
    # MFTCoder's trainer deletes old checkpoints only `if saving_limit` (0: keep all); full fine-tuning sets 2 for
    # null or < 1. mft's saving_limit is >= 1 or null, so 0 must not be copied (it would fail `mft validate`).
    src = write_json(tmp_path / "c.json", {"data_paths": "[a,b]", "output_dir": "o", "pretrained_model_path": "m",
                                           "peft_type": peft_type, "saving_limit": limit})
    result, _ = mftcoder.import_mftcoder(src)
    assert result.config["saving_limit"] == expected


@pytest.mark.parametrize("steps,expected", [(0, None), (50, 50)])
def test_checkpointing_steps_zero_is_no_step_checkpoints(tmp_path, steps, expected):
    # MFTCoder saves by step only `if checkpointing_steps`; mft's save_every_n_steps is >= 1 or null.
    src = write_json(tmp_path / "c.json", {"data_paths": "[a,b]", "output_dir": "o", "pretrained_model_path": "m",
                                           "checkpointing_steps": steps})
    result, _ = mftcoder.import_mftcoder(src)
    assert result.config["save_every_n_steps"] == expected


def test_placeholder_resume_from_checkpoint_is_an_mftcoder_adapter(tmp_path):
    # "$CKPT" stands for an MFTCoder adapter path, as a real path would: not written, nothing to fill in.
    src = write_json(tmp_path / "c.json", {"data_paths": "[a,b]", "output_dir": "o", "pretrained_model_path": "m",
                                           "resume_from_checkpoint": "$CKPT"})
    result, text = mftcoder.import_mftcoder(src)
    assert result.fill_in == [] and "FILL IN" not in text
    assert "mft resumes only its own checkpoints" in dict(result.dropped)["resume_from_checkpoint"]
    assert result.config["resume"] is None


@pytest.mark.parametrize("targets", [None, [], ""])
def test_empty_target_modules_is_all_linear(tmp_path, targets):
    # MFTCoder's `if args.target_modules: ... else: "all-linear"`; an empty list in mft would match no linear.
    src = write_json(tmp_path / "c.json", {"data_paths": "[a,b]", "output_dir": "o", "pretrained_model_path": "m",
                                           "peft_type": "lora", "target_modules": targets})
    result, _ = mftcoder.import_mftcoder(src)
    assert result.config["model"]["lora"]["target_modules"] == "all-linear"
