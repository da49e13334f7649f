"""mft_components/training/output_lock.py and the leftover cleanup it makes safe (checkpoint.remove_partial_checkpoints).

A second lock of one output_dir is refused naming the holder; through `mft run`, a 2-rank run started on the
output_dir of a live 1-rank run stops on both ranks naming its PID and host and changes nothing; once the holder
is killed, the next run puts back the checkpoint that a re-save killed between its two renames had set aside,
and continues from it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mft_components.training import checkpoint as ck
from mft_components.training.output_lock import LOCK_FILE, OutputDirBusy, OutputDirLock
from tests.conftest import REPO_ROOT, file_tree
from tests.test_recipes import _config, _wait_for, assets  # noqa: F401  (assets: a fixture)


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    """flock locks belong to an open file: a second OutputDirLock, even in this process, is refused until the
    first is released; the message names the holder's PID, host and start time and the lock file."""
    first, second = OutputDirLock(tmp_path / "out"), OutputDirLock(tmp_path / "out")
    first.acquire()
    with pytest.raises(OutputDirBusy) as refused:
        second.acquire()
    message = str(refused.value)
    assert f"output_dir {tmp_path / 'out'} is in use by another run: PID {os.getpid()} on host " \
           f"{socket.gethostname()}, started 20" in message
    assert str(tmp_path / "out" / LOCK_FILE) in message and not second.held
    first.release()
    second.acquire()
    assert second.held
    second.release()


def _adapter_checkpoint(output_dir: Path, step: int, value: float) -> Path:
    return ck.save_checkpoint(output_dir, step, weights={"x.lora_A.weight": torch.full((2, 2), value)},
                              adapter_config={"r": 2}, meta={"method": "lora"}, recipe_state={"step": step})


def test_a_resave_killed_between_its_renames_is_put_back(tmp_path, capsys):
    """What a kill between the two renames of a re-save leaves (step_3 set aside in step_3.old-*/ckpt, the new
    step_3 complete in step_3.tmp-*, no step_3): the set-aside checkpoint goes back; a pruned step's .tmp-delete
    and a partial save are removed, never put back."""
    out = tmp_path / "out"
    old = Path(tempfile.mkdtemp(prefix="step_3.old-", dir=_adapter_checkpoint(out, 3, 1.0).parent))
    os.replace(out / "step_3", old / "ckpt")
    new = Path(tempfile.mkdtemp(prefix="step_3.tmp-", dir=out))
    new.rmdir()
    os.replace(_adapter_checkpoint(out, 3, 2.0), new)
    os.replace(_adapter_checkpoint(out, 1, 1.0), out / "step_1.tmp-delete")  # a pruned step, deletion killed
    (out / "step_5.tmp-abc").mkdir()  # a save killed while writing
    (out / "step_5.tmp-abc" / ck.ADAPTER_WEIGHTS).write_bytes(b"partial")

    removed = ck.remove_partial_checkpoints(out)
    assert sorted(p.name for p in out.iterdir()) == ["step_3"]
    assert len(removed) == 4
    assert ck.verify_checkpoint(out / "step_3")["step"] == 3
    assert ck.load_checkpoint_weights(out / "step_3")["x.lora_A.weight"].eq(1.0).all()  # the one set aside
    assert f"note: {out / 'step_3'}: put back the checkpoint that a save killed halfway left in " \
           f"{old.name}/ckpt" in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_run_on_one_output_dir_is_refused_and_a_killed_resave_is_put_back(assets, tmp_path, capsys):  # noqa: F811
    """Run A (1 rank) trains in out; run B (2 ranks, `mft run --nproc-per-node 2`) on out stops on both ranks
    naming A's PID and host, changing nothing (A is stopped meanwhile, so out holds still). A is killed while
    re-saving a step, between the two renames; the next run puts that checkpoint back and continues from it."""
    import cli

    out = tmp_path / "out"
    cfg = _config(assets, tmp_path, max_steps=10_000, save_every_n_steps=1, gradient_accumulation_steps=1,
                  **{"data.valid_size": 0})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    mft = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "run"]
    log = open(tmp_path / "a.log", "w")
    a = subprocess.Popen([*mft, "lora_finetune_distributed", "--config", str(cfg)], stdout=log,
                         stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    try:
        assert _wait_for(lambda: (out / "step_2").is_dir(), 240), (tmp_path / "a.log").read_text()[-3000:]
        os.kill(a.pid, signal.SIGSTOP)
        inputs = [out, *map(Path, assets["data_paths"]), Path(assets["model_dir"])]
        before = file_tree(*inputs)
        b = subprocess.run([*mft, "--nproc-per-node", "2", "--standalone", "lora_finetune_distributed", "--config",
                            str(cfg)], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
        assert b.returncode != 0
        message = f"error: output_dir {out} is in use by another run: PID {a.pid} on host {socket.gethostname()}"
        assert (b.stdout + b.stderr).count(message) == 2, b.stderr[-3000:]  # rank 0 and rank 1
        assert file_tree(*inputs) == before
    finally:
        a.kill()
        a.wait()
        log.close()

    # A kill between the two renames of a re-save of the newest step: set aside in .old-*, complete in .tmp-*.
    step, newest = ck.list_checkpoints(out)[-1]
    aside = tempfile.mkdtemp(prefix=f"step_{step}.old-", dir=out)
    shutil.copytree(newest, tempfile.mkdtemp(prefix=f"step_{step}.tmp-", dir=out), dirs_exist_ok=True)
    os.replace(newest, os.path.join(aside, "ckpt"))
    capsys.readouterr()
    assert cli.main(["run", "lora_finetune_distributed", "--config", str(cfg), "resume=auto",
                     f"max_steps={step + 1}"]) == 0
    captured = capsys.readouterr()
    assert f"put back the checkpoint that a save killed halfway left in {os.path.basename(aside)}/ckpt" in captured.err
    assert f"resumed from {out / f'step_{step}'} at step {step}" in captured.out
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert (out / f"step_{step + 1}").is_dir()
