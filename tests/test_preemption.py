"""mft_components/training/preemption.py: SIGTERM / SIGINT stop a run in order.

In-process: what a signal does before and during training, with and without saving; in a child process: a second
signal and the grace period end the process at once. Through `mft run` on a tiny model, 1 rank and 2 ranks
(`--nproc-per-node 2`, gloo): SIGTERM to the mft process stops every rank after the same step with status 75 and a
checkpoint of that step, leaves no process behind, and resuming from it reaches exactly the weights, losses and
evaluations of a run that never stopped, with no metrics.jsonl row written twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mft_components.training import checkpoint as ck
from mft_components.training.preemption import PREEMPTED_EXIT_CODE, StopOnSignal
from tests.conftest import REPO_ROOT, file_tree, run_torchrun
from tests.test_recipes import LORA_RECIPE, _config, _rank_pid, _records, _wait_for, assets  # noqa: F401


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs in this (main) thread at the next bytecode


def test_a_signal_while_training_is_agreed_after_the_step(capsys):
    """Training: the first SIGTERM is noted (not fatal) and agreed; the same signal delivered again at once (by the
    scheduler and by torchrun) is not a second one; the previous handlers come back."""
    before = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal(save=True, grace_s=None)
    stop.install()
    try:
        stop.start_training()
        assert stop.agreed() is None
        _deliver(signal.SIGTERM)
        _deliver(signal.SIGTERM)
        assert stop.agreed() == signal.SIGTERM
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "SIGTERM: finishing this optimizer step, then saving a checkpoint and stopping" in capsys.readouterr().err


@pytest.mark.parametrize("training, save, code", [(False, True, PREEMPTED_EXIT_CODE), (True, False, 128 + 2)])
def test_a_signal_that_ends_the_run_at_once(capsys, training, save, code):
    """Before training (nothing to save) or with save_on_preemption: false, SIGINT ends the run by SystemExit with
    its status, not a KeyboardInterrupt."""
    stop = StopOnSignal(save=save, grace_s=None)
    stop.install()
    try:
        if training:
            stop.start_training()
        with pytest.raises(SystemExit) as ended:
            _deliver(signal.SIGINT)
    finally:
        stop.uninstall()
    assert ended.value.code == code
    assert ("before training started" if not training else "save_on_preemption: false") in capsys.readouterr().err


_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from mft_components.training.preemption import REPEAT_AFTER_S, StopOnSignal
    stop = StopOnSignal(save=True, grace_s=float(sys.argv[1]) if sys.argv[1] != "none" else None)
    stop.install()
    stop.start_training()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(REPEAT_AFTER_S + 0.2)
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal: ends at once
    time.sleep(30)
    sys.exit(0)
""")


@pytest.mark.parametrize("grace, message", [("none", "a second SIGTERM: ending now"),
                                            ("0.5", "did not finish within preemption_grace_s=0.5 after SIGTERM")])
def test_a_second_signal_or_the_grace_period_ends_the_process(grace, message):
    child = subprocess.run([sys.executable, "-c", _CHILD, grace], capture_output=True, text=True, cwd=REPO_ROOT,
                           timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, child.stderr
    assert message in child.stderr and "Traceback" not in child.stderr


# ------------------------------------------------------------------------------------- through the CLI


def _rows(out: Path) -> tuple[list, list]:
    timing = ("tokens_per_s", "peak_memory_gb")
    train = [{k: v for k, v in r.items() if k not in timing} for r in _records(out, "train")]
    evals = [(r["step"], r["loss"], r["task_loss"]) for r in _records(out, "eval")]
    return train, evals


def _sigterm_and_resume(assets, tmp_path: Path, nproc: int) -> None:  # noqa: F811
    """SIGTERM a run through `mft run` while it trains; it must stop with 75 and a checkpoint of the step it
    stopped at; resuming it must reach what the uninterrupted run reached."""
    import cli

    steps = 8
    cfg = _config(assets, tmp_path, max_steps=steps, eval_every_n_steps=1, **{"model.lora.dropout": 0.1})
    launcher = ["--nproc-per-node", str(nproc), "--standalone", "--monitor-interval", "0.5"] if nproc > 1 else []
    run = ["run", *launcher, "lora_finetune_distributed", "--config", str(cfg)]
    mft = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    inputs = [*map(Path, assets["data_paths"]), Path(assets["model_dir"])]
    before = file_tree(*inputs)
    straight, out = tmp_path / "straight", tmp_path / "out"
    if nproc == 1:
        assert cli.main([*run, f"output_dir={straight}"]) == 0
    else:
        run_torchrun(LORA_RECIPE, "--config", cfg, f"output_dir={straight}", nproc=nproc)

    log_path = tmp_path / "interrupted.log"
    with open(log_path, "w") as log:
        mft_run = subprocess.Popen([*mft, *run], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        trainers = []
        try:
            trained = lambda: (out / "metrics.jsonl").is_file() and '"train"' in (out / "metrics.jsonl").read_text()  # noqa: E731
            assert _wait_for(trained, 300), log_path.read_text()[-3000:]
            trainers = [mft_run.pid] if nproc == 1 else [_rank_pid(mft_run, r) for r in range(nproc)]
            for pid in trainers:  # hold them while the signal travels, so that the run cannot finish meanwhile
                os.kill(pid, signal.SIGSTOP)
            os.kill(mft_run.pid, signal.SIGTERM)  # mft forwards it to torchrun, torchrun to its workers
            if nproc > 1:
                assert _wait_for(lambda: "closing signal SIGTERM" in log_path.read_text(), 60)
            for pid in trainers:
                os.kill(pid, signal.SIGCONT)
            assert mft_run.wait(timeout=300) == PREEMPTED_EXIT_CODE, log_path.read_text()[-3000:]
        finally:
            mft_run.kill()
    text = log_path.read_text()
    stopped = re.search(rf"stopped by SIGTERM after step (\d+): {re.escape(str(out))}/step_(\d+) holds it", text)
    assert stopped and stopped.group(1) == stopped.group(2), text[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < steps and ck.latest_checkpoint(out) == out / f"step_{step}"
    assert ck.load_recipe_state(out / f"step_{step}")["evaluations_pending"]  # saved on the way out, before them
    assert text.count("Traceback") == (0 if nproc == 1 else 1)  # torchrun's own, of the signal it got; no rank's
    assert not [pid for pid in trainers if Path(f"/proc/{pid}").exists()]  # every rank is gone

    if nproc == 1:
        assert cli.main([*run, "resume=auto"]) == 0
    else:
        resumed = subprocess.run([*mft, *run, "resume=auto"], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                                 timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = ck.load_checkpoint_weights(straight / f"step_{steps}"), ck.load_checkpoint_weights(out / f"step_{steps}")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert _rows(out) == _rows(straight)  # every step's loss and lr, every evaluation, each once
    rows = [(r["kind"], r["step"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert len(rows) == len(set(rows))
    assert file_tree(*inputs) == before


@pytest.mark.slow
def test_sigterm_one_rank_saves_and_resumes_exactly(assets, tmp_path):  # noqa: F811
    _sigterm_and_resume(assets, tmp_path, nproc=1)


@pytest.mark.slow
def test_sigterm_two_ranks_saves_and_resumes_exactly(assets, tmp_path):  # noqa: F811
    _sigterm_and_resume(assets, tmp_path, nproc=2)
