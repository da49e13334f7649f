"""mft_components/training/resume_check.py: what a resumed run refuses and applies, and the record it compares.

The table is checked against every key the recipes read (the schema and the builders' signatures), so a new key
is classified deliberately; the comparison against hand-made checkpoint metadata; the optimizer and schedule
restore (``state.keep_configured_hyperparameters``) against the lr computed by hand; and, through ``mft run`` and
``mft validate`` on a tiny model, refusals (another architecture, LoRA alpha, seq_len, seed, data changed
mid-epoch) and applied changes (lr, weight_decay, max_steps) with the record the next checkpoint keeps.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from mft_components.code_eval.options import CodeEvalOptions
from mft_components.data.build import build_mft_data
from mft_components.loss.task_weighted import TaskWeightedLoss
from mft_components.models.build import build_model, load_tokenizer
from mft_components.models.lora import LoRAOptions
from mft_components.recipe_config.schema import LoRARecipeConfig
from mft_components.training import checkpoint as ck
from mft_components.training.lr_schedule import cosine_with_warmup, lr_factor
from mft_components.training.resume_check import APPLY, REFUSE, _UNKNOWN, check_resume, rule_for, run_record
from mft_components.training.state import keep_configured_hyperparameters
from tests.conftest import file_tree
from tests.test_recipes import _config, _records, _write_tasks, assets  # noqa: F401  (assets: a fixture)
from tests.tiny_models import make_tiny_model_dir

RUNTIME = {"device", "distributed", "dtype", "tokenizer", "seed", "rank", "world_size", "params", "optimizer",
           "num_training_steps", "last_epoch"}


def _keys() -> list[str]:
    """Every key a recipe config can hold: the schema's top level and each builder's arguments."""
    keys = [f.name for f in dataclasses.fields(LoRARecipeConfig)  # sections are their keys below
            if f.name != "eval" and "runtime_args" not in f.metadata]
    for section, builder in (("model", build_model), ("tokenizer", load_tokenizer), ("data", build_mft_data),
                             ("loss", TaskWeightedLoss), ("optimizer", torch.optim.AdamW),
                             ("lr_scheduler", cosine_with_warmup)):
        keys += [f"{section}._component_"] + [f"{section}.{name}" for name in inspect.signature(builder).parameters
                                              if name not in RUNTIME and name != "lora"]
    keys += [f"model.lora.{name}" for name in LoRAOptions.__annotations__]
    keys += [f"eval.code.{f.name}" for f in dataclasses.fields(CodeEvalOptions)]
    return keys


def test_every_key_has_a_rule():
    """A key added to the schema or a builder is refused or applied on purpose, never by the unknown-key fallback."""
    unclassified = [key for key in _keys() if rule_for(key) is _UNKNOWN]
    assert not unclassified, unclassified
    assert rule_for("model.lora.rank").action == REFUSE and rule_for("model.lora.dropout").action == APPLY
    assert rule_for("my_recipe_key") is _UNKNOWN and _UNKNOWN.action == APPLY  # a custom recipe's key: printed


def _meta(**config_changes) -> dict:
    config = {"output_dir": "o", "seed": 42, "max_steps": 4, "resume": None,
              "model": {"_component_": "mft_components.models.build_model", "model_dir": "/m", "method": "lora",
                        "lora": {"rank": 4, "alpha": 8}},
              "data": {"_component_": "mft_components.data.build_mft_data", "data_paths": ["a"], "seq_len": 64},
              "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3, "betas": [0.9, 0.999]}}
    for key, value in config_changes.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def test_check_resume_compares_with_the_builders_defaults():
    """Absent keys equal their defaults (truncation: drop, betas as a tuple), the checkpoint's resolved LoRA
    equals this run's; each difference is a refusal naming both values and why, or a change from the next step."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Llama's default
    meta = {"step": 4, "config": _meta(), "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, "use_rslora": False,
                                                    "target_modules": targets}}
    same = _meta(**{"data.truncation": "drop", "optimizer.betas": (0.9, 0.999), "resume": "auto",
                    "model.lora.target_modules": None})
    check = check_resume(meta, same, {"model": {"model_type": "llama"}})
    assert check.refusals == [] and check.changes == []

    changed = _meta(**{"model.lora.rank": 8, "data.packing": "padding", "optimizer.lr": 5e-3, "max_steps": 6,
                       "clip_grad_norm": 0.5})
    check = check_resume(meta, changed, {"model": {"model_type": "llama"}})
    assert check.refusals == [
        'data.packing: "pack" (checkpoint) -> "padding" (this run): samples per row: the saved data position counts '
        "rows of the old layout",
        "model.lora.rank: 4 (checkpoint) -> 8 (this run): the adapter's matrices are rank wide"]
    assert [(c["step"], c["key"], c["old"], c["new"]) for c in check.changes] == [
        (5, "clip_grad_norm", None, 0.5), (5, "max_steps", 4, 6), (5, "optimizer.lr", 1e-3, 5e-3)]
    assert "optimizer.lr: 0.001 -> 0.005 from step 5 (the schedule continues from this peak lr)" in check.change_lines()
    with pytest.raises(ck.ResumeError, match=r"(?s)step_4 was trained with another configuration.*model.lora.rank"):
        check.raise_refusals("o/step_4")


def test_content_behind_the_paths_is_compared(tmp_path):
    """Another model (config.json) or other tasks are refused; a data file changed mid-epoch is refused naming it,
    at an epoch end it is applied; the same content at another path is a change, not a refusal."""
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
    (tmp_path / "m1" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["Llama"]}))
    (tmp_path / "m2" / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3"]}))
    for task in ("a", "b"):
        (tmp_path / "data" / task).mkdir(parents=True)
        (tmp_path / "data" / task / "x.jsonl").write_text('{"text": "1"}\n')
    config = _meta(**{"model.model_dir": str(tmp_path / "m1"),
                      "data.data_paths": [str(tmp_path / "data" / "a"), str(tmp_path / "data" / "b")]})
    record = run_record(config)
    assert list(record["tasks"]) == ["a", "b"] and record["tasks"]["a"][0]["name"] == "x.jsonl"
    meta = {"step": 2, "config": config, "trained_with": record, "task_names": ["a", "b"],
            "position": {"epoch": 0, "step_in_epoch": 2, "epoch_complete": False}}

    other_model = _meta(**{"model.model_dir": str(tmp_path / "m2"), "data.data_paths": config["data"]["data_paths"]})
    (refusal,) = check_resume(meta, other_model, run_record(other_model)).refusals
    assert refusal.startswith(f"model.model_dir: {tmp_path / 'm1'} (Llama) (checkpoint) -> {tmp_path / 'm2'} "
                              "(Qwen3) (this run): another config.json")
    swapped = {**config, "data": {**config["data"], "data_paths": config["data"]["data_paths"][::-1]}}
    assert check_resume(meta, swapped, run_record(swapped)).refusals == [
        "data.data_paths: tasks ['a', 'b'] (checkpoint) -> ['b', 'a'] (this run): the data position, task_weights "
        "and CoBa's state are per task, in this order"]

    (tmp_path / "data" / "a" / "x.jsonl").write_text('{"text": "2"}\n')
    (refusal,) = check_resume(meta, config, run_record(config)).refusals
    assert f"task a: {tmp_path / 'data' / 'a' / 'x.jsonl'} changed (sha256 " in refusal
    assert "mid-epoch (epoch 0, 2 steps into it)" in refusal
    at_end = {**meta, "position": {"epoch": 0, "step_in_epoch": 5, "epoch_complete": True}}
    check = check_resume(at_end, config, run_record(config))
    assert check.refusals == [] and check.changes[0]["key"] == "data (content)"

    shutil.copytree(tmp_path / "data", tmp_path / "moved")
    (tmp_path / "moved" / "a" / "x.jsonl").write_text('{"text": "1"}\n')
    moved = {**config, "data": {**config["data"], "data_paths": [str(tmp_path / "moved" / t) for t in "ab"]}}
    check = check_resume(meta, moved, run_record(moved))
    assert check.refusals == [] and [c["key"] for c in check.changes] == ["data.data_paths"]


def _adamw_with_schedule(lr: float, weight_decay: float, steps: int):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay)
    return param, optimizer, cosine_with_warmup(optimizer, steps, warmup_steps=1, min_lr=1e-4)


def test_restore_keeps_this_runs_hyperparameters_and_rebases_the_schedule():
    """The saved optimizer and schedule state restore the moments and the schedule's position; weight_decay and the
    peak lr are this run's, and the lr of the next step is the new peak times the schedule's factor at that step
    (exactly the saved lr when nothing changed)."""
    param, optimizer, scheduler = _adamw_with_schedule(1e-3, 0.0, 8)
    for _ in range(3):
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    saved_optimizer, saved_schedule = optimizer.state_dict(), scheduler.state_dict()
    saved_lr = optimizer.param_groups[0]["lr"]

    def restore(lr, weight_decay, steps):
        param, optimizer, scheduler = _adamw_with_schedule(lr, weight_decay, steps)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(saved_optimizer)
        scheduler.load_state_dict(saved_schedule)
        keep_configured_hyperparameters(optimizer, scheduler, configured)
        return optimizer, scheduler

    optimizer, _ = restore(1e-3, 0.0, 8)
    assert optimizer.param_groups[0]["lr"] == saved_lr  # nothing changed: bit for bit

    optimizer, scheduler = restore(5e-3, 0.5, 12)
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.5 and group["initial_lr"] == 5e-3 and scheduler.base_lrs == [5e-3]
    expected = [5e-3 * lr_factor(s, warmup=1, num_training_steps=12, floor=1e-4 / 5e-3) for s in range(3, 6)]
    got = []
    for _ in range(3):
        got.append(group["lr"])
        scheduler.step()
    assert got == expected
    torch.testing.assert_close(optimizer.state_dict()["state"][0]["exp_avg"], saved_optimizer["state"][0]["exp_avg"])


# ------------------------------------------------------------------------------------- through the CLI


def _err_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if "Traceback" not in line)


@pytest.mark.slow
def test_resume_through_mft_run_refuses_or_applies_each_change(assets, tmp_path, capsys):  # noqa: F811
    """A 4-step run saved at step 2; resuming step_2 with another architecture, LoRA alpha, seq_len and seed is
    refused naming each key with both values (and so is data changed mid-epoch, naming the file), by `mft run`
    and by `mft validate`, changing nothing; lr, weight_decay and max_steps are applied, printed, used by the
    schedule from step 3 and recorded in the next checkpoint."""
    import cli

    data = [str(p) for p in _write_tasks(tmp_path / "data")]
    cfg = _config(assets, tmp_path, save_every_n_steps=2, **{"data.data_paths": data})
    assert cli.main(["run", "lora_finetune_distributed", "--config", str(cfg)]) == 0
    other = make_tiny_model_dir(tmp_path / "qwen3", family="qwen3", tokenizer_dir=assets["model_dir"])
    refused = tmp_path / "refused"
    refused.mkdir()
    shutil.copytree(tmp_path / "out" / "step_2", refused / "step_2")
    inputs = (tmp_path / "data", tmp_path / "qwen3", Path(assets["model_dir"]))
    before = file_tree(refused, *inputs)
    capsys.readouterr()

    run = ["run", "lora_finetune_distributed", "--config", str(cfg), f"output_dir={refused}", "resume=auto"]
    assert cli.main([*run, f"model.model_dir={other}", "model.lora.alpha=16", "data.seq_len=128", "seed=1"]) == 1
    err = _err_lines(capsys.readouterr().err)
    assert f"resume error: {refused / 'step_2'} was trained with another configuration" in err
    assert f"model.model_dir: {assets['model_dir']} (LlamaForCausalLM) (checkpoint) -> {other} (Qwen3ForCausalLM)" in err
    assert "model.lora.alpha: 8 (checkpoint) -> 16 (this run)" in err
    assert "data.seq_len: 64 (checkpoint) -> 128 (this run)" in err and "seed: 42 (checkpoint) -> 1 (this run)" in err
    lock = str(refused / ".mft-run.lock")  # the refused run's own file: it locked output_dir before looking
    assert {k: v for k, v in file_tree(refused, *inputs).items() if k != lock} == before

    assert cli.main(["validate", "--config", str(cfg), f"output_dir={refused}", "resume=auto", "model.lora.rank=8",
                     "--no-data"]) == 1
    err = capsys.readouterr().err
    assert f"'resume' is 'auto': it would continue {refused / 'step_2'}, trained with another configuration: " \
           "model.lora.rank: 4 (checkpoint) -> 8 (this run)" in err

    task_file = Path(data[0]) / "train.jsonl"
    original = task_file.read_bytes()
    task_file.write_bytes(original + b'{"prompt": "1+1=", "answer": "2"}\n')
    assert cli.main(run) == 1
    err = capsys.readouterr().err
    assert f"data.data_paths: task add: {task_file} changed (sha256 " in err and "mid-epoch (epoch 0, 2 steps" in err
    task_file.write_bytes(original)

    applied = tmp_path / "applied"
    applied.mkdir()
    shutil.copytree(tmp_path / "out" / "step_2", applied / "step_2")
    assert cli.main(["run", "lora_finetune_distributed", "--config", str(cfg), f"output_dir={applied}",
                     "resume=auto", "optimizer.lr=0.005", "optimizer.weight_decay=0.5", "max_steps=6"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {applied / 'step_2'} with 4 change(s):" in out
    assert f"output_dir: \"{tmp_path / 'out'}\" -> \"{applied}\" from step 3" in out  # a checkpoint copied here
    assert "optimizer.lr: 0.01 -> 0.005 from step 3 (the schedule continues from this peak lr)" in out
    assert "optimizer.weight_decay: 0.01 -> 0.5 from step 3" in out
    assert "max_steps: 4 -> 6 from step 3 (the learning-rate schedule's total follows it)" in out
    lrs = {r["step"]: r["lr"] for r in _records(applied, "train")}
    assert lrs == {s: pytest.approx(5e-3 * lr_factor(s - 1, warmup=1, num_training_steps=6, floor=1e-4 / 5e-3),
                                    rel=1e-12) for s in range(3, 7)}
    meta = ck.read_checkpoint_meta(applied / "step_6")
    assert meta["config"]["optimizer"]["lr"] == 0.005 and meta["config"]["max_steps"] == 6
    assert [(c["step"], c["key"], c["old"], c["new"]) for c in meta["changes"]] == [
        (3, "max_steps", 4, 6), (3, "output_dir", str(tmp_path / "out"), str(applied)),
        (3, "optimizer.lr", 0.01, 0.005), (3, "optimizer.weight_decay", 0.01, 0.5)]
    assert meta["trained_with"]["model"]["architectures"] == ["LlamaForCausalLM"]
