"""`mft init`: a config for one's own model and data, sized for the machine, validated (interop/init_config.py)."""

from __future__ import annotations

import json
import re

import pytest

import cli
from mft_components.config import load_config, registry
from mft_components.config.core import read_yaml, to_container
from mft_components.interop.init_config import cpu_has_bf16, set_yaml_value
from tests.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="module")
def model_and_tasks(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("init")
    model = make_tiny_model_dir(root / "my model", family="qwen2", tokenizer_dir=smollm2_dir)
    tasks = []
    for task in ("sql", "tests"):
        (root / "data" / task).mkdir(parents=True)
        (root / "data" / task / "train.jsonl").write_text(
            "".join(json.dumps({"prompt": f"{task} {i}", "answer": f"answer {i}"}) + "\n" for i in range(6)))
        tasks.append(root / "data" / task)
    return model, tasks


def shipped(name: str) -> dict:
    return read_yaml(registry.builtin_config(name).path.read_text())


def test_init_writes_a_validated_config_sized_for_a_cpu(model_and_tasks, tmp_path, capsys, monkeypatch):
    model, tasks = model_and_tasks
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "--model", str(model), "--data", *map(str, tasks), "--machine", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "mft init: wrote my_run.yaml" in out and "my_run.yaml: OK for recipe lora_finetune_distributed" in out
    cfg = to_container(load_config(tmp_path / "my_run.yaml"))
    reference = shipped("qwen_lora")  # a qwen2 model, LoRA: the shipped Qwen config with the CPU's sizes
    assert cfg["model"] == {**reference["model"], "model_dir": str(model), "activation_checkpointing": False}
    assert cfg["tokenizer"]["path"] == str(model)
    assert cfg["data"]["data_paths"] == [str(t) for t in tasks]
    assert (cfg["data"]["seq_len"], cfg["data"]["valid_size"], "valid_ratio" in cfg["data"]) == (512, 4, False)
    assert (cfg["micro_batch_size"], cfg["gradient_accumulation_steps"], cfg["epochs"]) == (1, 1, 1)
    assert cfg["dtype"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert cfg["output_dir"] == "outputs/my_run"
    assert {k: v for k, v in cfg.items() if k in ("optimizer", "lr_scheduler", "loss")} == {
        k: v for k, v in reference.items() if k in ("optimizer", "lr_scheduler", "loss")}
    # A second init does not overwrite it.
    assert cli.main(["init", "--model", str(model), "--data", str(tasks[0])]) == 1
    assert "my_run.yaml exists; pass --force" in capsys.readouterr().err


def test_init_for_a_gpu_keeps_the_shipped_sizes_but_not_beyond_the_model(model_and_tasks, tmp_path, capsys):
    model, tasks = model_and_tasks
    out = tmp_path / "q.yaml"
    assert cli.main(["init", "--model", str(model), "--data", str(tasks[0]), "--machine", "gpu", "--method", "qlora",
                     "-o", str(out), "--output-dir", str(tmp_path / "run")]) == 0
    cfg = read_yaml(out.read_text())
    reference = shipped("qwen_qlora")
    max_positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    assert max_positions < reference["data"]["seq_len"]
    assert cfg["data"] == {**reference["data"], "data_paths": [str(tasks[0])], "seq_len": max_positions}
    assert {k: v for k, v in cfg.items() if k not in ("model", "data", "output_dir")} == {
        k: v for k, v in reference.items() if k not in ("model", "data", "output_dir")}
    assert "OK for recipe lora_finetune_distributed" in capsys.readouterr().out


def test_init_errors_name_what_is_missing(tmp_path, capsys):
    assert cli.main(["init", "--model", str(tmp_path / "nope"), "--data", str(tmp_path), "-o",
                     str(tmp_path / "a.yaml")]) == 1
    assert "--model" in capsys.readouterr().err and not (tmp_path / "a.yaml").exists()
    (tmp_path / "m").mkdir()
    assert cli.main(["init", "--model", str(tmp_path / "m"), "--data", str(tmp_path), "-o", str(tmp_path / "a.yaml")]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_set_yaml_value_keeps_every_other_line():
    text = ("a: 1   # one\nsec:\n  x: old        # shipped note\n               # its continuation\n"
            "  items:\n    - p\n    - q\n  y: 2\nz: 3\n")
    new = set_yaml_value(text, "sec.items", ["r/s", "t: u"])
    new = set_yaml_value(new, "sec.x", 5)
    new = set_yaml_value(new, "sec.added", True, "mine")
    assert read_yaml(new) == {"a": 1, "sec": {"x": 5, "items": ["r/s", "t: u"], "y": 2, "added": True}, "z": 3}
    assert re.search(r"\n  x: 5 +# shipped note\n +# its continuation\n  items:\n", new)
    assert new.startswith("a: 1   # one\n") and new.endswith("# mine\nz: 3\n")


def test_cpu_bf16_detection():
    assert cpu_has_bf16("flags\t: fpu sse avx512f avx512_bf16 amx_tile")
    assert cpu_has_bf16("flags\t: fpu amx_bf16 amx_tile")
    assert not cpu_has_bf16("flags\t: fpu sse avx2 avx512f")
