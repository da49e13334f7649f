"""End-to-end tests of recipes/lora_finetune_distributed.py and recipes/full_finetune_distributed.py.

A tiny random-initialised Llama (tests/tiny_models.py) with SmolLM2's real tokenizer, two tiny tasks written
here, runs in-process (one rank) or under torchrun with 2 CPU processes (gloo). References: the uninterrupted
run (resume), the 1-rank run (2 ranks), `transformers` + `peft` (saved adapter).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import runpy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mft_components.training import checkpoint as ck
from tests.conftest import REPO_ROOT, run_torchrun
from tests.tiny_models import make_tiny_model_dir
from tests.tolerances import assert_close_rounding

LORA_RECIPE = REPO_ROOT / "recipes" / "lora_finetune_distributed.py"
FULL_RECIPE = REPO_ROOT / "recipes" / "full_finetune_distributed.py"


def _write_tasks(root: Path, n: int = 24) -> list[str]:
    """Two small learnable tasks: single-digit addition and shouting a word."""
    rng = random.Random(0)
    paths = []
    for task in ("add", "upper"):
        (root / task).mkdir(parents=True, exist_ok=True)
        with open(root / task / "train.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                if task == "add":
                    a, b = rng.randint(0, 9), rng.randint(0, 9)
                    rec = {"chat_rounds": [{"role": "human", "content": f"{a}+{b}="},
                                           {"role": "bot", "content": str(a + b)}]}
                else:
                    w = rng.choice(["cat", "dog", "fish", "bird", "tree"])
                    rec = {"prompt": f"shout {w}", "answer": w.upper() + "!"}
                f.write(json.dumps(rec) + "\n")
        paths.append(str(root / task))
    return paths


@pytest.fixture(scope="module")
def assets(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("recipe_assets")
    model_dir = make_tiny_model_dir(root / "model", family="llama", tokenizer_dir=smollm2_dir)
    return {"model_dir": str(model_dir), "data_paths": _write_tasks(root / "data"), "root": root}


def _config(assets, tmp_path: Path, name: str = "cfg", method: str = "lora", **overrides) -> Path:
    cfg = {
        "output_dir": str(tmp_path / "out"),
        "model": {"_component_": "mft_components.models.build_model", "model_dir": assets["model_dir"],
                  "method": method},
        "tokenizer": {"_component_": "mft_components.models.load_tokenizer", "path": assets["model_dir"]},
        "data": {"_component_": "mft_components.data.build_mft_data", "data_paths": assets["data_paths"],
                 "valid_size": 2, "seq_len": 64, "num_workers": 0},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-2 if method != "full" else 2e-3},
        "lr_scheduler": {"_component_": "mft_components.training.lr_schedule.cosine_with_warmup", "warmup_steps": 1,
                         "min_lr": 1e-4},
        "dtype": "fp32",
        "max_steps": 4,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "tensorboard": False,
        "plots": False,
    }
    if method != "full":
        cfg["model"]["lora"] = {"rank": 4, "alpha": 8, "dropout": 0.0}
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(recipe: Path, config: Path, *overrides: str) -> None:
    recipe_main = runpy.run_path(str(recipe), run_name="mft_test")["recipe_main"]
    recipe_main(["--config", str(config), *overrides])


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_training_reduces_loss(assets, tmp_path, method):
    """Four epochs over the same data: the last epoch's mean training loss is clearly below the first's.

    The tiny model's frozen random lm_head and final norm cap how far LoRA can move its near-uniform predictions
    (~ln(vocab) = 10.8 nats), so the margin asked of every method is one LoRA reaches (~0.25 nats); full
    fine-tuning goes much further.
    """
    recipe = FULL_RECIPE if method == "full" else LORA_RECIPE
    overrides = {"optimizer.lr": 3e-3} if method == "full" else {
        "optimizer.lr": 5e-2, "model.lora": {"rank": 8, "alpha": 32, "dropout": 0.0}}
    cfg = _config(assets, tmp_path, method=method, max_steps=None, epochs=4, gradient_accumulation_steps=1,
                  micro_batch_size=2, eval_every_n_steps=None, **overrides)
    _run(recipe, cfg)
    train = _records(tmp_path / "out", "train")
    mean = [sum(r["loss"] for r in train if r["epoch"] == e) / sum(r["epoch"] == e for r in train) for e in range(4)]
    assert mean[3] < mean[0] - 0.15, mean
    evals = _records(tmp_path / "out", "eval")
    assert [e["step"] for e in evals][0] == 0 and len(evals) == 5  # before training, then once per epoch
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert set(evals[-1]["task_loss"]) == {"add", "upper"}
    meta = ck.read_checkpoint_meta(ck.latest_checkpoint(tmp_path / "out"))
    assert meta["method"] == method and meta["task_names"] == ["add", "upper"] and meta["step"] == len(train)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_matches_uninterrupted(assets, tmp_path, method):
    """Stop at step 2 (a copied checkpoint is what a killed run leaves) and resume: step 4 equals the straight run."""
    recipe = FULL_RECIPE if method == "full" else LORA_RECIPE
    extra = {"model.lora.dropout": 0.1} if method == "lora" else {}  # dropout: the RNG state must resume too
    cfg = _config(assets, tmp_path, method=method, save_every_n_steps=2, eval_every_n_steps=2, **extra)
    _run(recipe, cfg)
    straight = tmp_path / "out"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "step_2", resumed / "step_2")
    _run(recipe, cfg, f"output_dir={resumed}", "resume=auto")

    a, b = ck.load_checkpoint_weights(straight / "step_4"), ck.load_checkpoint_weights(resumed / "step_4")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    losses = {r["step"]: r["loss"] for r in _records(straight, "train")}
    assert [(r["step"], r["loss"]) for r in _records(resumed, "train")] == [(3, losses[3]), (4, losses[4])]
    assert _records(resumed, "eval")[-1]["task_loss"] == _records(straight, "eval")[-1]["task_loss"]
    # The evaluation history came back too: the checkpoint's validation losses are the straight run's.
    assert ck.read_checkpoint_meta(resumed / "step_4")["valid_losses"] == ck.read_checkpoint_meta(straight / "step_4")["valid_losses"]


@pytest.mark.slow
def test_resume_at_epoch_boundary_matches_uninterrupted(assets, tmp_path):
    """Resume from the checkpoint that ends epoch 0 (dropout on): the RNG must be restored before epoch 1's
    loader iterator draws from it, as it was in the run that saved."""
    cfg = _config(assets, tmp_path, max_steps=None, epochs=2, save_every_n_steps=1, micro_batch_size=4,
                  **{"model.lora.dropout": 0.3})
    _run(LORA_RECIPE, cfg)
    straight = tmp_path / "out"
    train = _records(straight, "train")
    boundary, last = max(r["step"] for r in train if r["epoch"] == 0), train[-1]["step"]
    assert boundary < last
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / f"step_{boundary}", resumed / f"step_{boundary}")
    _run(LORA_RECIPE, cfg, f"output_dir={resumed}", "resume=auto")
    a, b = ck.load_checkpoint_weights(straight / f"step_{last}"), ck.load_checkpoint_weights(resumed / f"step_{last}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    losses = {r["step"]: r["loss"] for r in train}
    assert [(r["step"], r["loss"]) for r in _records(resumed, "train")] == [
        (step, losses[step]) for step in range(boundary + 1, last + 1)
    ]


@pytest.mark.slow
def test_two_ranks_match_one_rank(assets, tmp_path):
    """The same global batch as 1 rank x 4 micro-batches and as 2 ranks x 2 (FSDP2, gloo): same adapter. The two
    ranks also run what compile: auto does on CUDA (whole decoder layers compiled, here with sdpa's mask) under
    FSDP2, with selective activation checkpointing inside the compiled layers, and check that it compiled; the one
    rank runs eagerly (sdpa_varlen).

    Plain SGD, so that the adapter is its initial value minus the sum of lr x gradient: a rounding difference in a
    gradient element moves the weight by lr times that difference. (AdamW divides each gradient by its own running
    magnitude: its first updates are about lr x sign(g), so an element whose gradient is ~0 moves by +-lr on a
    rounding difference, and no tolerance short of lr holds on every CPU.) Every gradient went through the loss's
    projection onto the vocabulary, a reduction of V terms, in a different order in the compiled graph and on
    another CPU's vector width: the tolerance is V x float32 eps of each tensor's update (tests/tolerances.py)."""
    sgd = {"optimizer": {"_component_": "torch.optim.SGD", "lr": 0.5}}
    init = _config(assets, tmp_path, name="init", max_steps=1, gradient_accumulation_steps=4,
                   **{"optimizer": {"_component_": "torch.optim.SGD", "lr": 0.0}})
    _run(LORA_RECIPE, init, f"output_dir={tmp_path / 'init'}")  # lr 0: the adapter as initialised
    one = _config(assets, tmp_path, name="one", max_steps=3, gradient_accumulation_steps=4, **sgd)
    _run(LORA_RECIPE, one, f"output_dir={tmp_path / 'one'}")
    two = _config(assets, tmp_path, name="two", max_steps=3, gradient_accumulation_steps=2, **sgd,
                  **{"model.attn_implementation": "sdpa", "model.compile": True,
                     "model.activation_checkpointing": "selective"})
    proc = run_torchrun(LORA_RECIPE, "--config", two, f"output_dir={tmp_path / 'two'}", nproc=2)
    assert "[mft] compile: whole decoder layers" in proc.stdout
    assert "every decoder layer runs compiled" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0 = ck.load_checkpoint_weights(tmp_path / "init" / "step_1")
    a, b = ck.load_checkpoint_weights(tmp_path / "one" / "step_3"), ck.load_checkpoint_weights(tmp_path / "two" / "step_3")
    assert a.keys() == b.keys() == w0.keys() and len(a) > 0
    vocab = json.loads((Path(assets["model_dir"]) / "config.json").read_text())["vocab_size"]
    for k in a:
        update = float((a[k] - w0[k]).abs().max())
        assert update > 0, k  # every adapter tensor trained
        assert_close_rounding(b[k], a[k], torch.float32, n=vocab, scale=update, msg=k)
    la = torch.tensor([r["loss"] for r in _records(tmp_path / "one", "train")], dtype=torch.float64)
    lb = torch.tensor([r["loss"] for r in _records(tmp_path / "two", "train")], dtype=torch.float64)
    assert_close_rounding(lb, la, torch.float32, n=vocab)


def test_coba_normalises_by_the_validation_losses_before_training(assets, tmp_path):
    """CoBa's reference is each task's loss on the whole validation split at step 0 (the evaluation the recipe
    runs before training), as MFTCoder's; its curves start from there."""
    cfg = _config(assets, tmp_path, max_steps=2, **{"loss": {"_component_": "mft_components.loss.TaskWeightedLoss",
                                                             "mode": "coba", "coba_warmup_steps": 1}})
    _run(LORA_RECIPE, cfg)
    before = _records(tmp_path / "out", "eval")[0]
    assert before["step"] == 0
    coba = ck.load_recipe_state(tmp_path / "out" / "step_2")["loss"]["coba"]
    reference = [before["task_loss"][t] for t in ("add", "upper")]
    assert coba["initial"] == pytest.approx(reference, rel=1e-6)
    assert len(coba["steps"]) == 2 and coba["weights"] != [0.5, 0.5]


@pytest.mark.slow
def test_early_stopping_and_saving_limit(assets, tmp_path, capsys):
    """lr 0: the validation loss never improves after the first evaluation, so patience 2 stops at step 3;
    saving_limit 1 keeps the newest checkpoint plus the best one."""
    cfg = _config(assets, tmp_path, max_steps=10, eval_every_n_steps=1, early_stopping_patience=2,
                  save_every_n_steps=1, saving_limit=1, **{"optimizer.lr": 0.0, "lr_scheduler.min_lr": 0.0})
    _run(LORA_RECIPE, cfg)
    out = tmp_path / "out"
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]
    assert [s for s, _ in ck.list_checkpoints(out)] == [1, 3]
    assert _records(out, "eval")[-1]["best_step"] == 1
    assert "early stopping" in capsys.readouterr().out


def test_final_checkpoint_holds_the_final_evaluation(assets, tmp_path):
    """The last step is saved by save_every_n_steps before the end's evaluation (not due at that step) runs: the
    final checkpoint is written again, so its metadata and recipe state carry that evaluation and its best step."""
    cfg = _config(assets, tmp_path, max_steps=4, eval_every_n_steps=3, save_every_n_steps=2)
    _run(LORA_RECIPE, cfg)
    out = tmp_path / "out"
    last = _records(out, "eval")[-1]
    assert last["step"] == 4 and last["best_step"] == 4  # the loss still falls at step 4
    meta, state = ck.read_checkpoint_meta(out / "step_4"), ck.load_recipe_state(out / "step_4")
    assert meta["valid_step"] == 4 and meta["valid_losses"] == last["task_loss"]
    assert state["early_stopping"]["best_step"] == 4 and state["evaluator"]["last"][0] == 4
    ck.verify_checkpoint(out / "step_4", resumable=True)


def test_bad_data_fails_before_the_model_loads(assets, tmp_path, capsys):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"chat_rounds": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n'
                                     '{"chat_rounds": [{"role": "wizard", "content": "x"}]}\n')
    cfg = _config(assets, tmp_path, **{"data.data_paths": [*assets["data_paths"], str(bad)]})
    with pytest.raises(SystemExit) as e:
        _run(LORA_RECIPE, cfg)
    assert "train.jsonl:2" in str(e.value.code) and "data error" in str(e.value.code)
    assert "trainable params" not in capsys.readouterr().out  # build_model never ran
    assert not (tmp_path / "out" / "step_1").exists()


@pytest.mark.slow
def test_tasks_from_datasets_files_train_and_resume_as_jsonl(assets, tmp_path):
    """The same two tasks as Parquet (chat_rounds column) and as a save_to_disk directory read through a column
    mapping train exactly as their JSONL files do, and a run stopped at step 2 resumes to the same step 4."""
    datasets = pytest.importorskip("datasets")
    add, upper = (Path(p) / "train.jsonl" for p in assets["data_paths"])
    datasets.Dataset.from_json(str(add)).to_parquet(str(tmp_path / "add.parquet"))
    rows = [json.loads(line) for line in upper.read_text().splitlines()]
    datasets.Dataset.from_list([{"question": r["prompt"], "solution": r["answer"]} for r in rows]).save_to_disk(
        str(tmp_path / "upper_saved"))
    tables = [str(tmp_path / "add.parquet"),
              {"path": str(tmp_path / "upper_saved"), "name": "upper",
               "columns": {"prompt": "question", "answer": "solution"}}]
    jsonl_cfg = _config(assets, tmp_path, "jsonl", save_every_n_steps=2, eval_every_n_steps=2)
    cfg = _config(assets, tmp_path, save_every_n_steps=2, eval_every_n_steps=2, **{"data.data_paths": tables})
    _run(LORA_RECIPE, jsonl_cfg, f"output_dir={tmp_path / 'jsonl'}")
    _run(LORA_RECIPE, cfg)
    straight, resumed = tmp_path / "out", tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "step_2", resumed / "step_2")
    _run(LORA_RECIPE, cfg, f"output_dir={resumed}", "resume=auto")
    losses = {r["step"]: r["loss"] for r in _records(tmp_path / "jsonl", "train")}
    assert {r["step"]: r["loss"] for r in _records(straight, "train")} == losses
    assert [(r["step"], r["loss"]) for r in _records(resumed, "train")] == [(3, losses[3]), (4, losses[4])]
    a, b = ck.load_checkpoint_weights(tmp_path / "jsonl" / "step_4"), ck.load_checkpoint_weights(resumed / "step_4")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_a_run_prints_no_library_noise(assets, tmp_path):
    """`mft run` of a QLoRA config (torchao loads) with a loader worker: stderr holds neither torchdata's `set_vital`
    deprecation warning nor torchao's `Failed to load ..._C...so` lines."""
    cfg = _config(assets, tmp_path, method="qlora", max_steps=1, **{"data.num_workers": 1})
    proc = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "run",
                           "lora_finetune_distributed", "--config", str(cfg)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "step_1").is_dir()
    assert "set_vital" not in proc.stderr and "Failed to load" not in proc.stderr, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_loss_stops_cleanly(assets, tmp_path, capsys, fused):
    """An absurd learning rate without clipping blows the weights up: the run stops at the first non-finite loss,
    names the step and the tasks, and the last good checkpoint is intact. With fused AdamW (the recipe's optimizer
    on CUDA) the bad step's update is skipped on a device flag and the run stops at the next log step or
    checkpoint, naming the first bad step; no checkpoint holds a non-finite weight."""
    every = {"save_every_n_steps": 2, "log_every_n_steps": 2, "optimizer.fused": True} if fused else {
        "save_every_n_steps": 1}
    cfg = _config(assets, tmp_path, max_steps=10, clip_grad_norm=None,
                  **{"optimizer.lr": 1e30, "lr_scheduler.warmup_steps": 0, "lr_scheduler.min_lr": 0.0, **every})
    with pytest.raises(SystemExit) as e:
        _run(LORA_RECIPE, cfg)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert re.search(r"non-finite (training loss|gradient norm) \(", err) and "at step" in err
    step = int(err.split("at step ")[1].split(";")[0])
    assert "add" in err or "upper" in err
    ckpts = ck.list_checkpoints(tmp_path / "out")
    if fused:
        assert [s for s, _ in ckpts] == list(range(2, step, 2))  # every checkpoint before the bad step
        for _, path in ckpts:
            assert all(torch.isfinite(t).all() for t in ck.load_checkpoint_weights(path).values())
    else:
        assert [s for s, _ in ckpts] == list(range(1, step))  # every finished step saved, the bad one not
    if ckpts and not fused:
        assert ck.load_recipe_state(ckpts[-1][1])["step"] == step - 1


@pytest.mark.slow
def test_saved_adapter_loads_into_peft(assets, tmp_path):
    """`peft` loads the checkpoint's adapter onto the base model and computes what our model with it computes."""
    import transformers
    from peft import PeftModel

    from mft_components.models import build_model

    cfg = _config(assets, tmp_path, max_steps=2, **{"model.lora.rank": 8, "model.lora.alpha": 32})
    _run(LORA_RECIPE, cfg)
    step_dir = tmp_path / "out" / "step_2"
    ours = build_model(assets["model_dir"], method="lora", lora={"rank": 8, "alpha": 32}, dtype="fp32")
    ck.load_adapter(ours, step_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(assets["model_dir"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(step_dir))
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        expected = ours.hf_model(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
        plain = base.get_base_model()(input_ids=ids).logits if hasattr(base, "get_base_model") else None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with peft_model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-4)  # the adapter is not zero
    del plain


@pytest.mark.slow
def test_two_rank_full_resume_is_exact(assets, tmp_path):
    """Full fine-tuning under FSDP2 on 2 ranks (an evaluation between saves): resuming at step 2 gives step 4's weights."""
    cfg = _config(assets, tmp_path, method="full", save_every_n_steps=2, eval_every_n_steps=3)
    run_torchrun(FULL_RECIPE, "--config", cfg, f"output_dir={tmp_path / 'a'}", nproc=2)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "step_2", tmp_path / "b" / "step_2")
    run_torchrun(FULL_RECIPE, "--config", cfg, f"output_dir={tmp_path / 'b'}", "resume=auto", nproc=2)
    a, b = ck.load_checkpoint_weights(tmp_path / "a" / "step_4"), ck.load_checkpoint_weights(tmp_path / "b" / "step_4")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def _write_matrix_tasks(root: Path) -> list[str]:
    """Three tasks of 20 / 12 / 8 short conversations: about 19 packed rows of 64 tokens, so a global batch of up
    to 24 rows runs into the padding rows that fill an epoch's last step, and with 2 ranks some micro-batches
    hold padding only on one rank."""
    rng = random.Random(2)
    words = ["def", "return", "list", "sorted", "x", "y", "map", "filter", "lambda", "print"]
    paths = []
    for task, n in (("fix", 20), ("doc", 12), ("test", 8)):
        (root / task).mkdir(parents=True)
        with open(root / task / "train.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
                a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))
                f.write(json.dumps({"chat_rounds": [{"role": "human", "content": f"{task}: {q}"},
                                                    {"role": "bot", "content": a}]}) + "\n")
        paths.append(str(root / task))
    return paths


@pytest.mark.slow
def test_every_batch_split_trains_the_same(assets, tmp_path):
    """ranks {1, 2} x micro_batch_size {1, 2, 3} x gradient_accumulation_steps {1, 2, 4}, packing and padding,
    every loss mode (180 runs of 2 steps, in one torchrun launch and one in-process run): each run finishes, and
    runs with the same global batch give the same adapter. SGD, so the adapter is the gradients themselves, not
    Adam's normalised signs. Before the fix, a micro-batch of padding only (sdpa_varlen) left q/k/v without a
    gradient on one rank and the 2-rank launch died in FSDP2's reduce-scatter."""
    from tests.dist.batch_split_matrix import MATRIX, run_matrix, run_name

    cfg = yaml.safe_load(_config(assets, tmp_path).read_text())
    cfg["model"]["attn_implementation"] = "sdpa_varlen"
    cfg["data"].update(data_paths=_write_matrix_tasks(tmp_path / "data"), valid_size=0, cache_dir="")
    cfg["loss"] = {"_component_": "mft_components.loss.TaskWeightedLoss"}
    cfg["optimizer"] = {"_component_": "torch.optim.SGD", "lr": 0.5}
    cfg["lr_scheduler"]["min_lr"] = 0.5  # constant
    cfg["max_steps"] = 2
    config = tmp_path / "matrix.yaml"
    config.write_text(yaml.safe_dump(cfg))

    script = REPO_ROOT / "tests" / "dist" / "batch_split_matrix.py"
    two_ranks = subprocess.Popen(  # both cores: 2 ranks in the background, 1 rank here
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script),
         str(config), str(tmp_path / "w2")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert len(run_matrix(str(config), str(tmp_path / "w1"))) == 90
        output, _ = two_ranks.communicate(timeout=900)
    finally:
        two_ranks.kill()
    assert two_ranks.returncode == 0 and "MATRIX OK 90 runs on 2 rank(s)" in output, output[-6000:]

    adapters = {}  # (packing, mode, global batch) -> [(run, adapter)]
    for world in (1, 2):
        for packing, mode, mbs, gas in itertools.product(*MATRIX.values()):
            name = run_name(packing, mode, world, mbs, gas)
            weights = ck.load_checkpoint_weights(tmp_path / f"w{world}" / name / "step_2")
            adapters.setdefault((packing, mode, world * mbs * gas), []).append((name, weights))
    compared = 0
    for runs in adapters.values():
        (ref_name, ref), others = runs[0], runs[1:]
        for name, weights in others:
            for k in ref:
                torch.testing.assert_close(weights[k], ref[k], rtol=1e-4, atol=1e-6, msg=f"{name} vs {ref_name}: {k}")
            compared += 1
    assert compared == 90  # 9 second splits of a global batch (2, 4, 6, 8, 12 rows) x 2 packings x 5 modes
    # Not vacuous: another global batch trains another adapter.
    one, big = adapters[("pack", "task", 1)][0][1], adapters[("pack", "task", 24)][0][1]
    assert max((one[k] - big[k]).abs().max() for k in one) > 1e-2


def _files(root: Path) -> dict[str, bytes]:
    # Not the output_dir lock: every run rewrites it with its PID (training/output_lock.py), refused or not.
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".mft-run.lock"}


@pytest.mark.slow
def test_checkpoints_are_verified_on_resume(assets, tmp_path, capsys):
    """Through `mft run`: a recipe_state.pt from another step placed in step_4 is refused naming the file; with
    step_4's adapter truncated, resume: auto says so, moves step_4 aside untouched and continues from step_2 to the
    same weights as the run that never stopped. Checkpoint directories get the umask's mode, not 0700."""
    import cli

    old_umask = os.umask(0o022)
    try:
        cfg = _config(assets, tmp_path, save_every_n_steps=2)
        assert cli.main(["run", "lora_finetune_distributed", "--config", str(cfg)]) == 0
        out = tmp_path / "out"
        assert oct((out / "step_2").stat().st_mode & 0o777) == "0o755"
        straight = ck.load_checkpoint_weights(out / "step_4")
        damaged = tmp_path / "damaged"
        shutil.copytree(out, damaged)
        capsys.readouterr()

        # Another step's recipe state in step_4 (same size, other content): refused, nothing changed.
        shutil.copy(damaged / "step_2" / "recipe_state.pt", damaged / "step_4" / "recipe_state.pt")
        before = _files(damaged)
        assert cli.main(["run", "lora_finetune_distributed", "--config", str(cfg), f"output_dir={damaged}",
                         f"resume={damaged / 'step_4'}", "max_steps=6"]) == 1
        err = capsys.readouterr().err
        assert f"resume error: resume: {damaged / 'step_4'} is not a resumable checkpoint" in err
        assert "step_4/recipe_state.pt: " in err and "the record in mft_checkpoint.json" in err
        assert _files(damaged) == before

        # The newest checkpoint's adapter truncated: resume: auto falls back to step_2, saying so.
        shutil.copy(out / "step_4" / "recipe_state.pt", damaged / "step_4" / "recipe_state.pt")
        adapter = damaged / "step_4" / "adapter_model.safetensors"
        adapter.write_bytes(adapter.read_bytes()[:100])
        before = _files(damaged / "step_4")
        assert cli.main(["run", "lora_finetune_distributed", "--config", str(cfg), f"output_dir={damaged}",
                         "resume=auto"]) == 0
        err = capsys.readouterr().err
        assert "resume: step_4 is damaged: " in err and "adapter_model.safetensors: 100 bytes, the record" in err
        assert "moved it to step_4.damaged; resuming from step_2" in err
    finally:
        os.umask(old_umask)
    assert _files(damaged / "step_4.damaged") == before
    resumed = ck.load_checkpoint_weights(damaged / "step_4")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun worker `rank` under `launcher` (found by its RANK environment variable)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(pid)
    todo, seen = [launcher.pid], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += children.get(pid, [])
    for pid in seen:
        try:
            if f"RANK={rank}".encode() in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    return None


def _wait_for(predicate, timeout: float) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_stopped_rank_ends_the_run_naming_it(assets, tmp_path, capsys):
    """SIGSTOP rank 1 of a 2-rank `mft run`: rank 0's collective times out after distributed_timeout_s and the
    run ends naming rank 1. Then the checkpoints it left are resumed on 1 rank with another global batch: a
    message, no traceback."""
    import signal

    out = tmp_path / "out"
    cfg = _config(assets, tmp_path, max_steps=10_000, save_every_n_steps=1, micro_batch_size=2,
                  gradient_accumulation_steps=1, distributed_timeout_s=15,
                  **{"data.valid_size": 0, "data.cache_dir": ""})
    log = open(tmp_path / "run.log", "w")
    run = subprocess.Popen(
        [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "run", "--nproc-per-node", "2",
         "--standalone", "--monitor-interval", "0.5", "lora_finetune_distributed", "--config", str(cfg)],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rank1 = None
    try:
        assert _wait_for(lambda: (out / "step_2").is_dir(), 240), (tmp_path / "run.log").read_text()[-3000:]
        rank1 = _rank_pid(run, 1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGSTOP)
        text = lambda: (tmp_path / "run.log").read_text(errors="replace")  # noqa: E731
        assert _wait_for(lambda: "stopped answering" in text(), 120), text()[-3000:]
    finally:
        if rank1 is not None:
            os.kill(rank1, signal.SIGCONT)  # its pending SIGTERM from torchrun ends it at once
        try:
            run.wait(timeout=120)
        finally:
            run.kill()
            log.close()
    assert run.returncode != 0
    message = text()
    assert "rank 0: a collective did not complete within distributed_timeout_s=15" in message
    assert "rank 1 stopped answering" in message and "[rank0]: Traceback" not in message  # (torchrun's own remains)

    # A 2-rank checkpoint (mid-epoch) on 1 rank with micro_batch_size 2 x GA 1: another global batch (2 rows, not 4).
    import cli

    capsys.readouterr()
    assert cli.main(["run", "lora_finetune_distributed", "--config", str(cfg), f"output_dir={tmp_path / 'one'}",
                     f"resume={out / 'step_1'}", "max_steps=100"]) == 1
    err = capsys.readouterr().err
    assert "resume error: cannot resume the data loader" in err and "same global batch" in err, err[-3000:]
