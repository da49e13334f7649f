"""`mft import mftcoder dpo_train_config.json`: MFTCoder's preference configs (its xxpo trainer) become configs of
the recipe preference_finetune_distributed.

The translated keys are checked here on MFTCoder's shipped dpo_train_config.json; the written config is validated
against the recipe's schema, and trained for 2 steps, where the recipe exists (it is built beside this import).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import cli
from mft_components.config import load_config, registry
from mft_components.interop import mftcoder
from mft_components.interop.mftcoder_dpo_keys import XXPO_KEYS
from tests.tiny_models import make_tiny_model_dir

# XXPOTrainArgs (MFTCoder's mftcoder_accelerate/src/xxpo/xxpo_arguments.py), every field in its order.
XXPOTRAINARGS = (
    "data_paths output_dir tb_dir pretrained_model_path model_type data_split peft_type quantization lora_rank "
    "lora_alpha lora_dropout target_modules xxpo beta rpo_alpha per_device_train_batch_size "
    "per_device_eval_batch_size tokenizer_type learning_rate min_lr weight_decay gradient_accumulation_steps "
    "lr_scheduler_type optimizer_type gradient_checkpointing gradient_checkpointing_use_reentrant warmup_steps "
    "num_train_epochs seed seq_length save_only_model resume_from_checkpoint auto_resume logging_steps save_steps "
    "eval_steps max_steps epoch_checkpointing shuffle_before_split early_stopping early_stopping_stall_num "
    "saving_limit attn_implementation chat_template distributed_type init_timeout_seconds "
    "make_vocab_size_divisible_by model_parallel_size use_slow_tokenizer world_size max_prompt_length max_length "
    "dataset_num_proc dtype disable_tqdm sanity_check ignore_bias_buffers"
).split()

# MFTCoder's shipped mftcoder_accelerate/src/configs/dpo_train_config.json, key for key.
SHIPPED_DPO = {
    "xxpo": "dpo", "data_paths": "$DATA_PATHS", "output_dir": "$OUTPUT_DIR", "tb_dir": "$TensorBoard_DIR",
    "pretrained_model_path": "$MODEL_NAME_OR_PATH", "model_type": "$MODEL_TYPE", "data_split": "99,1",
    "attn_implementation": "flash_attention_2", "beta": 0.1, "rpo_alpha": 0.5, "peft_type": "lora", "lora_rank": 64,
    "lora_alpha": 128, "lora_dropout": 0.0, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
    "tokenizer_type": "AutoTokenizer", "dataset_num_proc": 1, "learning_rate": 5e-7, "weight_decay": 0.01,
    "gradient_accumulation_steps": 8, "lr_scheduler_type": "cosine", "warmup_steps": 100, "num_train_epochs": 2,
    "seed": 1105, "max_prompt_length": 2048, "max_length": 4096, "logging_steps": 20, "save_steps": 500,
    "eval_steps": 500, "epoch_checkpointing": False, "saving_limit": 5,
}
RECIPE = "preference_finetune_distributed"


def write_json(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg, indent=4))
    return path


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return list(node) if hasattr(node, "_content") and isinstance(node._content, list) else node


def _recipe_schema():
    """The preference recipe's CONFIG_SCHEMA, or None while the recipe is not in this checkout."""
    try:
        recipe = registry.resolve_recipe(RECIPE)
    except FileNotFoundError:
        return None
    return cli.recipe_schema(recipe)


def test_every_xxpotrainargs_key_is_in_the_table():
    assert list(XXPO_KEYS) == XXPOTRAINARGS


def test_shipped_dpo_config_translates_every_key(tmp_path, capsys):
    src = write_json(tmp_path / "dpo_train_config.json", SHIPPED_DPO)
    out = tmp_path / "dpo.yaml"
    assert cli.main(["import", "mftcoder", str(src), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    result, text = mftcoder.import_mftcoder(src)
    assert result.recipe == RECIPE and f"mft run {RECIPE} --config THIS.yaml" in text
    assert f"check it: mft validate --config {out} --recipe {RECIPE}" in printed
    # Every XXPOTrainArgs key is behind an mft key or listed with the reason it is not written.
    used = {k for sources in result.sources.values() for k in sources.split(", ")}
    dropped = dict(result.dropped)
    assert used | set(dropped) == set(XXPOTRAINARGS) and not used & set(dropped)
    assert "does not pass it to TRL" in dropped["min_lr"] and "does not pass it to TRL" in dropped["seq_length"]
    assert [(k, t) for k, t, _ in result.fill_in] == [
        ("data_paths", "data.data_paths"), ("output_dir", "output_dir"), ("pretrained_model_path", "model.model_dir")]
    cfg = load_config(out)
    expected = {
        "loss._component_": "mft_components.loss.preference.PreferenceLoss",
        "loss.preference": "rpo", "loss.beta": 0.1, "loss.rpo_alpha": 0.5, "loss.mode": "sample",
        "data._component_": "mft_components.data.preference.build_preference_data",
        "data.data_paths": ["$DATA_PATHS"], "data.valid_ratio": 0.01, "data.max_prompt_length": 2048,
        "data.max_length": 4096, "data.task_sampling": "proportional",
        "model.method": "lora", "model.lora.rank": 64, "model.lora.alpha": 128, "model.lora.dropout": 0.0,
        "model.lora.target_modules": "all-linear", "model.attn_implementation": "auto",
        "model.activation_checkpointing": True, "reference": "auto",
        "optimizer.lr": 5e-7, "optimizer.weight_decay": 0.0, "optimizer.betas": [0.9, 0.999],
        "lr_scheduler.warmup_steps": 100, "lr_scheduler.min_lr": 0.0,
        "epochs": 2, "max_steps": None, "seed": 1105, "dtype": "bf16", "micro_batch_size": 1,
        "eval_micro_batch_size": 1, "gradient_accumulation_steps": 8, "clip_grad_norm": 1.0,
        "log_every_n_steps": 20, "save_every_n_steps": 500, "eval_every_n_steps": 500, "saving_limit": 5,
        "distributed_timeout_s": 3600,
    }
    assert {k: _get(cfg, k) for k in expected} == expected
    assert "weight_decay: 0.0  # weight_decay" in text and "it is 0.01 there" in text
    schema = _recipe_schema()
    if schema is None:
        pytest.skip(f"recipe {RECIPE} is not in this checkout: the keys are checked, the schema cannot be")
    from mft_components.config import check_config

    problems = check_config(cfg, schema)
    assert problems and all("$" in p for p in problems), problems  # only the placeholders still to fill in


@pytest.mark.parametrize("keys,expected,dropped", [
    ({"xxpo": "dpo", "rpo_alpha": None}, {"loss.preference": "dpo"}, "rpo_alpha"),
    ({"xxpo": "orpo", "rpo_alpha": 1.0, "beta": 0.25}, {"loss.preference": "orpo", "loss.beta": 0.25}, "rpo_alpha"),
    ({"peft_type": None, "dtype": "float"}, {"model.method": "full", "dtype": "fp32"}, "lora_rank"),
    ({"lr_scheduler_type": "constant", "warmup_steps": 10}, {"lr_scheduler.min_lr": 5e-7,
                                                            "lr_scheduler.warmup_steps": 0}, "min_lr"),
    ({"warmup_steps": 0.1, "max_steps": 7, "data_split": "9,1"}, {"lr_scheduler.warmup_steps": 0.1, "max_steps": 7,
                                                                  "data.valid_ratio": 0.1}, "seq_length"),
])
def test_xxpo_choices(tmp_path, keys, expected, dropped):
    src = write_json(tmp_path / "c.json", {**SHIPPED_DPO, **keys})
    result, _ = mftcoder.import_mftcoder(src)
    assert {k: _get(result.config, k) for k in expected} == expected
    assert dropped in dict(result.dropped)


BAD = [  # (key, value, words of the error)
    ("xxpo", "kto", "xxpo: 'kto'; expected dpo or orpo"),
    ("data_split", "x,y", "data_split: 'x,y' is not a split"),
    ("dtype", "int8", "dtype: 'int8'; expected one of bfloat16"),
    ("beta", "0.1", "beta: expected int or float, got '0.1'"),
    ("bta", 0.1, "bta: not an XXPOTrainArgs key (MFTCoder v0.5's xxpo_accelerate.py would refuse it too); did you "
                 "mean 'beta'?"),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_values_are_errors_naming_the_key(tmp_path, capsys, key, value, words):
    src = write_json(tmp_path / "c.json", {**SHIPPED_DPO, key: value})
    assert cli.main(["import", "mftcoder", str(src), "-o", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mft import: error: {src}") and words in err and "Traceback" not in err, err
    assert not (tmp_path / "c.yaml").exists()


def test_migration_page_lists_every_xxpo_key():
    page = (Path(__file__).resolve().parent.parent / "docs" / "migrating-from-mftcoder.md").read_text()
    section = page[page.index("## Preference training"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    table = "\n".join(line.split("|")[1] for line in section.splitlines() if line.startswith("| `"))
    assert [k for k in XXPOTRAINARGS if f"`{k}`" not in table] == []


@pytest.mark.slow
def test_imported_dpo_config_trains_two_steps(tmp_path, smollm2_dir):
    """The shipped config with its placeholders filled: validates and trains 2 steps on two tiny tasks of pairs."""
    if _recipe_schema() is None:
        pytest.skip(f"recipe {RECIPE} is not in this checkout (built beside this import)")
    model = make_tiny_model_dir(tmp_path / "model", family="llama", tokenizer_dir=smollm2_dir)
    rng, paths = random.Random(0), []
    for task in ("add", "shout"):
        lines = []
        for _ in range(12):
            a, b, w = rng.randint(0, 9), rng.randint(0, 9), rng.choice(["cat", "dog", "fish"])
            prompt, good, bad = (f"{a}+{b}=", str(a + b), str(a + b + 1)) if task == "add" else (
                f"shout {w}", w.upper() + "!", w)
            lines.append({"chosen": [{"role": "human", "content": prompt}, {"role": "bot", "content": good}],
                          "rejected": [{"role": "human", "content": prompt}, {"role": "bot", "content": bad}]})
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        paths.append(str(tmp_path / f"{task}.jsonl"))
    src = write_json(tmp_path / "dpo.json", {
        **SHIPPED_DPO, "data_paths": "[" + ",".join(paths) + "]", "output_dir": str(tmp_path / "out"),
        "pretrained_model_path": str(model), "data_split": "80,20", "max_steps": 2, "learning_rate": 1e-3,
        "lora_rank": 4, "lora_alpha": 8, "max_prompt_length": 16, "max_length": 32, "gradient_accumulation_steps": 2,
        "logging_steps": 1, "save_steps": 2, "eval_steps": 2})
    out = tmp_path / "dpo.yaml"
    assert cli.main(["import", "mftcoder", str(src), "-o", str(out)]) == 0
    assert cli.main(["validate", "--config", str(out), "--recipe", RECIPE]) == 0
    assert cli.main(["run", RECIPE, "--config", str(out), "dtype=fp32", "model.activation_checkpointing=false",
                     "tensorboard=false"]) == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert (tmp_path / "out" / "step_2").is_dir()
