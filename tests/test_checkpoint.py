"""Tests for mft_components/checkpoint.py: formats readable by transformers, exact state round trips, atomicity."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import transformers
from torchdata.stateful_dataloader import StatefulDataLoader

from mft_components.training import checkpoint as ck
from mft_components.training.lr_schedule import cosine_with_warmup
from mft_components.training.state import capture_rng_state, restore_rng_state
from tests.conftest import REPO_ROOT
from tests.tiny_models import make_tiny_model_dir

META = {"method": "lora", "base_model_dir": "/x", "task_names": ["a", "b"]}


def _adapter(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64, generator=g),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4, generator=g)}


def _save(out, step, **kw):
    return ck.save_checkpoint(out, step, weights=_adapter(step), meta=META, recipe_state={"step": step},
                              adapter_config={"peft_type": "LORA"}, **kw)


def test_full_checkpoint_is_a_transformers_model_dir(tmp_path):
    """Sharded full weights + index + config load with AutoModelForCausalLM and compute the same logits."""
    src = make_tiny_model_dir(tmp_path / "src", family="qwen2", vocab_size=256)  # tied embeddings
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    path = ck.save_checkpoint(tmp_path / "out", 3, weights=model.state_dict(), meta={**META, "method": "full"},
                              model_config=model.config.to_dict(), max_shard_bytes=40_000)
    assert (path / ck.FULL_INDEX).is_file() and len(list(path.glob("model-*-of-*.safetensors"))) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert ck.read_checkpoint_meta(path)["step"] == 3
    assert set(ck.load_checkpoint_weights(path)) == set(model.state_dict()) - {"lm_head.weight"}


def test_recipe_state_round_trip_weights_only(tmp_path):
    """Optimizer, scheduler, data loader and RNG states survive torch.load(weights_only=True) and resume exactly."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    sched = cosine_with_warmup(opt, 10, warmup_steps=2)
    loader = StatefulDataLoader(list(range(20)), batch_size=2, shuffle=True)
    it = iter(loader)
    for _ in range(3):
        next(it)
        lin(torch.randn(2, 4)).sum().backward()
        opt.step(), sched.step()
    state = {"step": 3, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
             "ranks": [{"dataloader": loader.state_dict(), "rng": capture_rng_state()}], "best": {"step": None}}
    ck.save_checkpoint(tmp_path, 3, weights=_adapter(), meta=META, recipe_state=state, adapter_config={})
    expected = ([next(it) for _ in range(3)], torch.rand(3), np.random.rand(), random.random())

    loaded = ck.load_recipe_state(tmp_path / "step_3")  # weights_only=True inside
    loader2 = StatefulDataLoader(list(range(20)), batch_size=2, shuffle=True)
    loader2.load_state_dict(loaded["ranks"][0]["dataloader"])
    it2 = iter(loader2)  # creating an iterator draws a seed: restore RNG afterwards, as the recipes do
    restore_rng_state(loaded["ranks"][0]["rng"])
    got = ([next(it2) for _ in range(3)], torch.rand(3), np.random.rand(), random.random())
    for a, b in zip(expected[0], got[0]):
        assert torch.equal(a, b)
    assert torch.equal(expected[1], got[1]) and expected[2:] == got[2:]
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 4).parameters(), lr=1e-2)
    sched2 = cosine_with_warmup(opt2, 10, warmup_steps=2)
    opt2.load_state_dict(loaded["optimizer"]), sched2.load_state_dict(loaded["lr_scheduler"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_saving_limit_keeps_newest_and_best(tmp_path):
    for step in (2, 4, 6, 8, 10):
        _save(tmp_path, step)
        ck.prune_checkpoints(tmp_path, saving_limit=2, keep=(4,))  # step 4 was the best evaluation
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4, 8, 10]
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_4", "step_8"]


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 5)
    path = ck.save_checkpoint(tmp_path, 5, weights=_adapter(99), meta=META, adapter_config={})
    assert torch.equal(ck.load_checkpoint_weights(path)[next(iter(_adapter()))], _adapter(99)[next(iter(_adapter()))])
    assert [p.name for p in tmp_path.iterdir()] == ["step_5"]


def test_resolve_resume(tmp_path):
    assert ck.resolve_resume(None, tmp_path) is None
    assert ck.resolve_resume("auto", tmp_path) is None  # nothing to resume from yet: a fresh start
    _save(tmp_path, 1)
    _save(tmp_path, 7)
    assert ck.resolve_resume("auto", tmp_path) == tmp_path / "step_7"
    assert ck.resolve_resume(str(tmp_path / "step_7"), tmp_path) == tmp_path / "step_7"
    assert ck.resolve_resume(str(tmp_path / "step_1"), tmp_path / "elsewhere") == tmp_path / "step_1"
    with pytest.raises(ck.ResumeError, match="resume: .* not a resumable checkpoint"):
        ck.resolve_resume(str(tmp_path), tmp_path)
    # Another run's later checkpoints would be "newest": pruning would delete this run's own, so refuse.
    with pytest.raises(ck.ResumeError, match="already holds checkpoints step_7 and this run resumes"):
        ck.resolve_resume(str(tmp_path / "step_1"), tmp_path)
    with pytest.raises(ck.ResumeError, match="already holds checkpoints step_1, step_7 and this run starts fresh"):
        ck.resolve_resume(None, tmp_path)


_WRITER = textwrap.dedent("""
    import sys, torch
    from mft_components.training import checkpoint as ck
    big = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(24)}  # ~100 MB per checkpoint
    for step in range(1, 1000):
        ck.save_checkpoint(sys.argv[1], step, weights=big, meta={"step": step}, recipe_state={"step": step},
                           adapter_config={"peft_type": "LORA"})
        print(step, flush=True)
""")


@pytest.mark.slow
def test_kill_mid_save_leaves_previous_checkpoint_whole(tmp_path):
    """SIGKILL a process while it writes a checkpoint: only whole checkpoints are ever listed or resumed from."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert proc.stdout.readline().strip() == "1"  # one checkpoint finished
        deadline = time.time() + 60
        while not any(".tmp-" in p.name for p in out.iterdir()):  # the next one is being written
            assert time.time() < deadline, "the writer never started a second checkpoint"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    partial = [p for p in out.iterdir() if ".tmp-" in p.name]
    ckpts = ck.list_checkpoints(out)
    assert ckpts, "the finished checkpoint disappeared"
    for step, path in ckpts:  # every listed checkpoint is complete and readable
        assert ck.load_recipe_state(path) == {"step": step}
        weights = ck.load_checkpoint_weights(path)
        assert len(weights) == 24 and torch.equal(weights["w3"], torch.full((1024, 1024), 3.0))
    assert ck.resolve_resume("auto", out) == ckpts[-1][1]
    if partial:
        assert ck.remove_partial_checkpoints(out) and not any(".tmp-" in p.name for p in out.iterdir())


@pytest.mark.parametrize("name", [ck.ADAPTER_WEIGHTS, ck.STATE_FILE, ck.META_FILE, ck.ADAPTER_CONFIG])
def test_resume_auto_steps_back_past_a_damaged_checkpoint(tmp_path, capsys, name):
    """The newest checkpoint's file truncated, garbage or emptied: resume: auto names it and what is wrong, moves
    the checkpoint aside untouched and resumes from the newest intact one; an explicit resume of it is refused."""
    for damage in ("truncated", "garbage", "empty"):
        out = tmp_path / damage
        _save(out, 2), _save(out, 4)
        path = out / "step_4" / name
        content = path.read_bytes()
        path.write_bytes({"truncated": content[: len(content) // 2], "garbage": b"\xff\xfe{garbage" * 7,
                          "empty": b""}[damage])
        damaged = {p.name: p.read_bytes() for p in (out / "step_4").iterdir()}
        with pytest.raises(ck.ResumeError, match=f"step_4 is not a resumable checkpoint: .*step_4/{name}"):
            ck.resolve_resume(str(out / "step_4"), out)
        assert ck.resolve_resume("auto", out) == out / "step_2"
        err = capsys.readouterr().err
        assert f"step_4 is damaged: {path}" in err and "moved it to step_4.damaged; resuming from step_2" in err
        assert {p.name: p.read_bytes() for p in (out / "step_4.damaged").iterdir()} == damaged
        assert [s for s, _ in ck.list_checkpoints(out)] == [2]
    # Nothing intact: no silent fresh start.
    out = tmp_path / "all"
    _save(out, 3)
    (out / "step_3" / name).write_bytes(b"")
    with pytest.raises(ck.ResumeError, match=f"no intact checkpoint in {out}:\n  .*step_3/{name}"):
        ck.resolve_resume("auto", out)
    assert ck.load_recipe_state(_save(tmp_path / "ok", 5))["step"] == 5


def test_resume_auto_skips_a_checkpoint_saved_without_recipe_state(tmp_path, capsys):
    """A weights-only save (recipe_state=None) is whole but not resumable: resume: auto steps past it and leaves it
    where it is, instead of calling it damaged and moving it aside; its files are still verified."""
    _save(tmp_path, 2)
    ck.save_checkpoint(tmp_path, 4, weights=_adapter(4), meta=META, adapter_config={"peft_type": "LORA"})
    assert ck.resolve_resume("auto", tmp_path) == tmp_path / "step_2"
    assert "damaged" not in capsys.readouterr().err
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 4]
    only = tmp_path / "only"
    ck.save_checkpoint(only, 3, weights=_adapter(3), meta=META, adapter_config={"peft_type": "LORA"})
    assert ck.resolve_resume("auto", only) is None and (only / "step_3").is_dir()
    (tmp_path / "step_4" / ck.ADAPTER_WEIGHTS).write_bytes(b"")
    assert ck.resolve_resume("auto", tmp_path) == tmp_path / "step_2"
    assert "step_4 is damaged" in capsys.readouterr().err


def test_a_hand_edited_consistency_record_is_named(tmp_path):
    """A record entry that is not {"size", "sha256"} (edited by hand) is a CheckpointError naming the file, not a
    TypeError from comparing sizes."""
    path = _save(tmp_path, 2)
    meta = json.loads((path / ck.META_FILE).read_text())
    meta[ck.RECORD_KEY][ck.ADAPTER_WEIGHTS] = {"size": "big"}
    (path / ck.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ck.CheckpointError, match=f"{ck.META_FILE}: its record entry for '{ck.ADAPTER_WEIGHTS}' is"):
        ck.verify_checkpoint(path)
