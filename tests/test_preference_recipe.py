"""End-to-end tests of recipes/preference_finetune_distributed.py on a tiny Llama with SmolLM2's tokenizer.

References: a separately loaded base model (the adapters-off reference), the on-the-fly reference (precompute),
the uninterrupted run (resume), the 1-rank 1 x 4 split (every other split of the global batch).
"""

from __future__ import annotations

import json
import os
import random
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mft_components.data.preference import build_preference_data, collate_pairs
from mft_components.loss.preference import pair_logps
from mft_components.models import build_model, prepare_batch
from mft_components.models.lora import adapters_disabled
from mft_components.training import checkpoint as ck
from tests.conftest import REPO_ROOT
from tests.tiny_models import make_tiny_model_dir

RECIPE = REPO_ROOT / "recipes" / "preference_finetune_distributed.py"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "tiny_dpo.yaml"


def _write_tasks(root: Path) -> list[str]:
    """Two preference tasks in the two record shapes: xxpo (addition) and TRL's (shouting a word)."""
    rng = random.Random(0)
    paths = []
    for task in ("add", "upper"):
        (root / task).mkdir(parents=True)
        with open(root / task / "train.jsonl", "w", encoding="utf-8") as f:
            for _ in range(14):
                if task == "add":
                    a, b = rng.randint(0, 9), rng.randint(0, 9)
                    q = {"role": "human", "content": f"{a}+{b}="}
                    rec = {"chosen": [q, {"role": "bot", "content": str(a + b)}],
                           "rejected": [q, {"role": "bot", "content": f"{a + b + rng.randint(1, 3)} or so"}]}
                else:
                    w = rng.choice(["cat", "dog", "fish", "bird", "tree"])
                    rec = {"prompt": f"shout {w}", "chosen": w.upper() + "!", "rejected": w}
                f.write(json.dumps(rec) + "\n")
        paths.append(str(root / task))
    return paths


@pytest.fixture(scope="module")
def assets(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("preference_assets")
    model_dir = make_tiny_model_dir(root / "model", family="llama", tokenizer_dir=smollm2_dir)
    return {"model_dir": str(model_dir), "data_paths": _write_tasks(root / "data")}


def _config(assets, tmp_path: Path, name: str = "cfg", **overrides) -> Path:
    cfg = yaml.safe_load(FIXTURE.read_text())
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["model"]["model_dir"] = assets["model_dir"]
    cfg["data"]["data_paths"] = assets["data_paths"]
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, *overrides: str) -> None:
    runpy.run_path(str(RECIPE), run_name="mft_test")["recipe_main"](["--config", str(config), *overrides])


def _records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _mft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_cli_validates_and_trains_two_steps(assets, tmp_path):
    """`mft validate` passes the fixture, names a bad key, and `mft run` trains 2 steps logging per-task metrics."""
    cfg = _config(assets, tmp_path)
    ok = _mft("validate", "--config", str(cfg))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _mft("validate", "--config", str(_config(assets, tmp_path, "bad", **{"data.max_prompt_length": 40,
                                                                                "loss.beta": -1})))
    assert bad.returncode != 0 and "data.max_prompt_length" in bad.stdout + bad.stderr
    assert "loss.beta" in bad.stdout + bad.stderr
    run = _mft("run", "preference_finetune_distributed", "--config", str(cfg))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    train = _records(tmp_path / "out", "train")
    assert [r["step"] for r in train] == [1, 2]
    for key in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp"):
        assert f"{key}/add" in train[-1] and f"{key}/upper" in train[-1]
    assert train[0]["margin"] == 0 and abs(train[0]["loss"] - 0.6931) < 1e-3  # LoRA starts as the reference
    evals = _records(tmp_path / "out", "eval")
    assert [e["step"] for e in evals] == [0, 2] and "accuracy/add" in evals[-1]
    assert (tmp_path / "out" / "step_2" / "adapter_model.safetensors").exists()


def test_adapters_off_reference_is_the_base_model(assets, smollm2_tokenizer):
    """The LoRA model with its adapters switched off computes the separately loaded base model's log-probs."""
    data = build_preference_data(smollm2_tokenizer, data_paths=assets["data_paths"], valid_ratio=0, max_length=32,
                                 max_prompt_length=16)
    batch = collate_pairs([data.train_samples[:2], data.train_samples[2:4]])
    torch.manual_seed(0)
    lora = build_model(assets["model_dir"], method="lora", dtype="fp32", lora={"rank": 4, "alpha": 8})
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)  # a trained adapter: the model is no longer the base
    base = build_model(assets["model_dir"], method="full", dtype="fp32")
    prepared = prepare_batch(batch, torch.device("cpu"), base.config)
    with torch.no_grad():
        expected = pair_logps(base(prepared)[0], prepared)[0]
        with adapters_disabled(lora):
            off = pair_logps(lora(prepared)[0], prepared)[0]
        on = pair_logps(lora(prepared)[0], prepared)[0]
    torch.testing.assert_close(off, expected, rtol=0, atol=1e-5)
    assert (on - expected).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("preference", ["dpo", "rpo"])
def test_precompute_equals_on_the_fly(assets, tmp_path, preference):
    """reference: precompute trains what the on-the-fly reference trains, and its stored log-probs are reused."""
    sgd = {"optimizer": {"_component_": "torch.optim.SGD", "lr": 0.5}, "loss.preference": preference,
           "max_steps": 3, "eval_every_n_steps": 3}
    _run(_config(assets, tmp_path, "fly", **sgd), f"output_dir={tmp_path / 'fly'}")
    _run(_config(assets, tmp_path, "pre", reference="precompute", **sgd), f"output_dir={tmp_path / 'pre'}")
    assert (tmp_path / "pre" / "reference_logps.pt").exists()
    a = ck.load_checkpoint_weights(tmp_path / "fly" / "step_3")
    b = ck.load_checkpoint_weights(tmp_path / "pre" / "step_3")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    fly, pre = _records(tmp_path / "fly", "train"), _records(tmp_path / "pre", "train")
    for x, y in zip(fly, pre):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["margin"] == pytest.approx(x["margin"], abs=1e-6)
    assert _records(tmp_path / "pre", "eval")[-1]["accuracy"] == _records(tmp_path / "fly", "eval")[-1]["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["auto", "precompute"])
def test_resume_is_exact(assets, tmp_path, reference, capsys):
    """Stopped at step 2 and resumed: step 4's adapter and losses equal the straight run's (the precomputed
    log-probs are reused, not recomputed)."""
    cfg = _config(assets, tmp_path, reference=reference, max_steps=4, save_every_n_steps=2, eval_every_n_steps=2,
                  **{"model.lora.dropout": 0.1})
    _run(cfg)
    straight, resumed = tmp_path / "out", tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "step_2", resumed / "step_2")
    if reference == "precompute":
        shutil.copy(straight / "reference_logps.pt", resumed / "reference_logps.pt")
    capsys.readouterr()
    _run(cfg, f"output_dir={resumed}", "resume=auto")
    if reference == "precompute":
        assert "reference log-probs: reusing" in capsys.readouterr().out
    a, b = ck.load_checkpoint_weights(straight / "step_4"), ck.load_checkpoint_weights(resumed / "step_4")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    losses = {r["step"]: r["loss"] for r in _records(straight, "train")}
    assert [(r["step"], r["loss"]) for r in _records(resumed, "train")] == [(3, losses[3]), (4, losses[4])]


@pytest.mark.slow
def test_full_fine_tuning_with_a_frozen_reference_copy(assets, tmp_path):
    """model.method: full: the reference is a frozen copy; step 1 is at the reference (margin 0), and training
    moves the policy away from it."""
    _run(_config(assets, tmp_path, **{"model.method": "full", "optimizer.lr": 1e-3}))
    train = _records(tmp_path / "out", "train")
    assert train[0]["margin"] == 0 and train[-1]["margin"] != 0
    assert (tmp_path / "out" / "step_2" / "config.json").exists()


@pytest.mark.slow
def test_every_batch_split_trains_the_same(assets, tmp_path):
    """ranks {1, 2} x micro-batches x accumulation for sample and task reductions: one global batch of 4 rows
    trains the same adapter however it is split. SGD with a constant rate: the adapter is the gradients."""
    from tests.conftest import run_torchrun

    cfg = _config(assets, tmp_path, **{"optimizer": {"_component_": "torch.optim.SGD", "lr": 0.5},
                                       "lr_scheduler.min_lr": 0.5, "data.valid_size": 0, "max_steps": 2,
                                       "model.attn_implementation": "sdpa_varlen"})
    script = REPO_ROOT / "tests" / "dist" / "preference_split_matrix.py"
    one_rank = "sample:1:4,sample:2:2,sample:4:1,task:1:4,task:4:1"
    two_ranks = "sample:1:2,sample:2:1,task:2:1,task:1:2"
    proc = subprocess.Popen([sys.executable, str(script), str(cfg), str(tmp_path / "w1"), one_rank],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        out2 = run_torchrun(script, str(cfg), str(tmp_path / "w2"), two_ranks, nproc=2, timeout=900).stdout
        out1, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert "SPLITS OK 5 runs on 1" in out1, out1[-3000:]
    assert "SPLITS OK 4 runs on 2" in out2
    for mode in ("sample", "task"):
        ref = ck.load_checkpoint_weights(tmp_path / "w1" / f"{mode}-w1-m1-g4" / "step_2")
        runs = [p for p in [*(tmp_path / "w1").glob(f"{mode}-*"), *(tmp_path / "w2").glob(f"{mode}-*")]
                if p.name != f"{mode}-w1-m1-g4"]
        assert len(runs) == (4 if mode == "sample" else 3)
        for run in runs:
            weights = ck.load_checkpoint_weights(run / "step_2")
            for k in ref:
                torch.testing.assert_close(weights[k], ref[k], rtol=1e-4, atol=1e-6, msg=f"{run.name}: {k}")

