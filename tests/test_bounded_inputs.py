"""Inputs that would exhaust the machine or pass unnoticed, refused or reported through the `mft` command: a YAML
anchor bomb, records over data.max_record_bytes, values validate must catch, FIFOs as task paths, damaged
tokenisation cache entries, samples dropped or truncated, a full disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from mft_components.data import tokenize
from tests.test_data import conv, data_config, write_jsonl


ANCHOR_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9)
) + "some_unknown_key: [*j, *j, *j, *j, *j, *j, *j, *j, *j, *j]\n"  # 10**11 strings once expanded


def test_yaml_anchor_bomb_is_refused_naming_the_file(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(ANCHOR_BOMB)
    assert cli.main(["validate", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"config error: {config}: its aliases (*name) expand to more than 1,000,000 values" in err, err
    # An override is bounded the same way.
    flow = "{" + ANCHOR_BOMB.strip().replace("\n", ", ") + "}"
    (tmp_path / "small.yaml").write_text("seed: 1\n")
    assert cli.main(["validate", "--config", str(tmp_path / "small.yaml"), f"data.seq_len={flow}"]) == 1
    assert "config error: override data.seq_len: its aliases (*name) expand" in capsys.readouterr().err


def test_a_record_over_max_record_bytes_is_a_bad_record_unread(smollm2_dir, tmp_path, capsys):
    big = json.dumps({"prompt": "x" * 3000, "answer": "y"})
    path = write_jsonl(tmp_path / "task" / "a.jsonl", [conv(0), big, conv(1)])
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "task"], max_record_bytes=2048)
    assert cli.main(["data", "--config", str(config)]) == 1
    assert (f"{path}:2: record: {len(big):,} bytes, over data.max_record_bytes=2,048; split it, or raise the bound"
            in capsys.readouterr().err)
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "task"], max_record_bytes=2048, on_bad_record="skip")
    assert cli.main(["data", "--config", str(config)]) == 0
    assert re.search(r"^task\s+3\s+1\s+2\s", capsys.readouterr().out, re.M)  # 3 records, 1 bad, 2 kept
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "task"], max_record_bytes=0)
    assert cli.main(["data", "--config", str(config)]) == 1
    assert "data.max_record_bytes: expected a positive integer" in capsys.readouterr().err


def test_a_valid_size_that_leaves_no_training_data_is_refused(smollm2_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "small" / "a.jsonl", [conv(i) for i in range(4)])
    write_jsonl(tmp_path / "big" / "a.jsonl", [conv(i) for i in range(9)])
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "small", tmp_path / "big"],
                         valid_size=100000)
    assert cli.main(["data", "--config", str(config)]) == 1
    assert ("data.valid_size: 100000 samples per task held out for validation leave too little to train on (small: 4 "
            "samples, 3 held out, 1 left to train on; big: 9 samples, 8 held out, 1 left to train on); expected fewer "
            "than the smallest task's 4 samples") in capsys.readouterr().err
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "small", tmp_path / "big"], valid_size=3)
    assert cli.main(["data", "--config", str(config)]) == 0


def test_fifos_as_or_inside_task_paths_are_named(smollm2_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "task" / "a.jsonl", [conv(0), conv(1)])
    os.mkfifo(tmp_path / "task" / "pipe.jsonl")  # reading it would block the build forever
    os.mkfifo(tmp_path / "given.jsonl")
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "task", tmp_path / "given.jsonl"])
    assert cli.main(["data", "--config", str(config)]) == 1
    assert (f"data.data_paths[1]: {tmp_path / 'given.jsonl'}: is a FIFO (named pipe), not a directory or a .jsonl file"
            in capsys.readouterr().err)
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "task"])
    assert cli.main(["data", "--config", str(config)]) == 0
    assert (f"data.data_paths[0]: {tmp_path / 'task'}: skipped 1 *.jsonl that are not regular files "
            f"({tmp_path / 'task' / 'pipe.jsonl'}: a FIFO (named pipe))") in capsys.readouterr().out


def test_a_damaged_cache_entry_is_rebuilt_with_a_warning(smollm2_dir, tmp_path, capsys):
    """Each damage as a later run meets it: the entry's checksums are verified at its first use in a process
    (`_VERIFIED` is that process's record, emptied here as a new run starts with it empty)."""
    write_jsonl(tmp_path / "task" / "a.jsonl", [conv(i) for i in range(3)])
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "task"])
    show = ["data", "--config", str(config), "--show", "3", "--color", "never"]
    assert cli.main(show) == 0
    first = capsys.readouterr().out
    [entry] = [p.parent for p in (tmp_path / "cache").rglob("info.json")]
    for damage in ("mask.npy all ones", "lengths.npy truncated", "ids.npy empty", "info.json empty"):
        name, what = damage.split(" ", 1)
        path = entry / name
        if what == "all ones":  # same size: only the hash can tell
            np.save(path, np.ones_like(np.load(path)))
        elif what == "truncated":
            path.write_bytes(path.read_bytes()[:-8])
        else:
            path.write_bytes(b"")
        tokenize._VERIFIED.clear()
        assert cli.main(show) == 0
        out, err = capsys.readouterr()
        assert f"[mft] warning: tokenisation cache entry {entry} is damaged (" in err, (damage, err)
        assert out == first, damage  # the prompts are still marked as not trained: the entry was rebuilt
        tokenize._VERIFIED.clear()
        assert cli.main(show) == 0
        out, err = capsys.readouterr()
        assert "warning" not in err and out == first, damage  # intact again


def test_validate_warns_per_task_about_samples_lost_to_seq_len(smollm2_dir, tmp_path, capsys):
    import yaml

    from tests.tiny_models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", "llama", tokenizer_dir=smollm2_dir)
    long = {"prompt": "Explain.", "answer": "word " * 200}
    write_jsonl(tmp_path / "short" / "a.jsonl", [conv(i) for i in range(40)] + [long])  # 1 of 41: 2%
    write_jsonl(tmp_path / "long" / "a.jsonl", [conv(i) for i in range(3)] + [long] * 2)  # 2 of 5: 40%
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "model": {"_component_": "mft_components.models.build_model", "model_dir": str(model),
                  "lora": {"rank": 4, "alpha": 8}},
        "tokenizer": {"_component_": "mft_components.models.load_tokenizer", "path": str(model)},
        "data": {"_component_": "mft_components.data.build_mft_data", "seq_len": 64, "num_workers": 0,
                 "valid_size": 1, "truncation": "drop", "cache_dir": str(tmp_path / "cache"),
                 "data_paths": [str(tmp_path / "short"), str(tmp_path / "long")]},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3},
    }))
    assert cli.main(["validate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert ("task short: 1 dropped of 41 samples (2%) as longer than data.seq_len=64 tokens (data.truncation: drop); "
            "raise data.seq_len to keep them whole\n") in out
    assert "WARNING: task long: 2 dropped of 5 samples (40%) as longer than data.seq_len=64" in out
    assert "WARNING: task short" not in out


@pytest.fixture
def full_disk(tmp_path):
    """A real 512 KiB tmpfs (needs the right to mount: root or CAP_SYS_ADMIN), unmounted afterwards."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_named_with_the_bytes_needed(full_disk, smollm2_dir, tmp_path, capsys):
    from mft_components.device import DiskFullError
    from mft_components.training import checkpoint as ck
    from tests.test_export import train_and_save
    from tests.tiny_models import make_tiny_model_dir

    # The tokenisation cache: the run goes on without caching, and says why.
    write_jsonl(tmp_path / "task" / "a.jsonl", [conv(i) for i in range(3)])
    (full_disk / "filler").write_bytes(b"\0" * (512 * 1024 - 8192))
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "task"], cache_dir=str(full_disk / "cache"))
    assert cli.main(["data", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert (f"[mft] warning: the disk is full: writing a tokenisation cache entry into {full_disk / 'cache'}"
            in err and "going on without caching it" in err), err
    (full_disk / "filler").unlink()

    # A checkpoint: nothing half-written is left.
    weights = {"base_model.model.x.lora_A.weight": torch.zeros(256, 1024)}  # 1 MB
    with pytest.raises(DiskFullError, match=rf"the disk is full: writing checkpoint step_3 into {full_disk} needs "
                                            r"about 1\.0 MB, 0\.[0-9] MB free there"):
        ck.save_checkpoint(full_disk, 3, weights=weights, meta={}, adapter_config={"r": 4})
    assert sorted(p.name for p in full_disk.iterdir()) == ["cache"]

    # An export of a model of 25.5 MB.
    base = make_tiny_model_dir(tmp_path / "base", "llama", vocab_size=49152, tokenizer_dir=smollm2_dir)
    checkpoint, _ = train_and_save(base, tmp_path / "run", "lora")
    assert cli.main(["export", str(checkpoint), "--output", str(full_disk / "export")]) == 2
    err = capsys.readouterr().err
    assert f"mft export: error: the disk is full: writing the export into {full_disk} needs about 25.5 MB, 0.5 MB free" in err, err
    assert sorted(p.name for p in full_disk.iterdir()) == ["cache"]


def test_wrong_shape_adamw_moments_are_named():
    from mft_components.training.state import gather_optimizer_state, load_optimizer_state

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = gather_optimizer_state(model, optimizer)
    state["state"]["0.weight"]["exp_avg_sq"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"recipe_state.pt: the optimizer's exp_avg_sq of 0.weight has shape \(3, 5\), "
                                         r"the parameter \(3, 4\); the file is damaged or from another model"):
        load_optimizer_state(model, optimizer, state)


@pytest.mark.slow
def test_a_1tb_tensor_in_a_base_models_header_and_a_bit_flipped_adapter_are_named(smollm2_dir, tmp_path, capsys):
    """A base model whose safetensors header claims 1 TB (in a file of a few bytes) is named by export, generate
    and validate before anything allocates for it; `mft generate --adapter` checks the checkpoint's consistency
    record as export does."""
    from tests.test_export import train_and_save
    from tests.tiny_models import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "base", "llama", vocab_size=49152, tokenizer_dir=smollm2_dir)
    checkpoint, _ = train_and_save(base, tmp_path / "run", "lora")
    raw = bytearray((checkpoint / "adapter_model.safetensors").read_bytes())
    raw[-5] ^= 0x10
    (checkpoint / "adapter_model.safetensors").write_bytes(raw)
    assert cli.main(["generate", "--model", str(base), "--adapter", str(checkpoint), "--prompt", "hi"]) == 2
    assert ("mft generate: error: damaged checkpoint: " in capsys.readouterr().err)

    hostile = tmp_path / "hostile"
    hostile.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (hostile / name).write_bytes((base / name).read_bytes())
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 18],
                                                       "data_offsets": [0, 1 << 40]}}).encode()
    header += b" " * (-len(header) % 8)
    (hostile / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    claim = (f"{hostile / 'model.safetensors'}: its header describes 1,099,511,627,776 bytes of tensors (1,099.5 "
             f"GB), the file holds 64 after the header")
    assert cli.main(["generate", "--model", str(hostile), "--prompt", "hi", "--template", "mft"]) == 2
    assert f"mft generate: error: --model {claim}" in capsys.readouterr().err
    ok_copy = train_and_save(base, tmp_path / "run2", "lora")[0]
    assert cli.main(["export", str(ok_copy), "--base", str(hostile), "--output", str(tmp_path / "out")]) == 2
    assert f"mft export: error: {claim}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_file_size_limit_is_named_like_a_full_disk(smollm2_dir, tmp_path):
    """Where no tmpfs can be mounted: `ulimit -f` (RLIMIT_FSIZE) makes writes fail with EFBIG in a child process."""
    import resource
    import signal
    import sys

    from tests.conftest import REPO_ROOT
    from tests.test_export import train_and_save
    from tests.tiny_models import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "base", "llama", vocab_size=49152, tokenizer_dir=smollm2_dir)
    checkpoint, _ = train_and_save(base, tmp_path / "run", "lora")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "export", str(checkpoint),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300, preexec_fn=limit_file_size, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert (f"mft export: error: a file would exceed this process's file-size limit (ulimit -f): writing the export "
            f"into {tmp_path} needs about 25.5 MB") in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_run_whose_checkpoint_fills_the_disk_stops_with_a_message(full_disk, smollm2_dir, tmp_path, capsys):
    from tests.test_recipes import _config, _write_tasks
    from tests.tiny_models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", "llama", tokenizer_dir=smollm2_dir)
    assets = {"model_dir": str(model), "data_paths": _write_tasks(tmp_path / "data", n=6)}
    cfg = _config(assets, tmp_path, max_steps=1, output_dir=str(full_disk / "out"))
    (full_disk / "filler").write_bytes(b"\0" * (512 * 1024 - 48 * 1024))  # room for metrics, not a checkpoint
    assert cli.main(["run", "lora_finetune_distributed", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"error: the disk is full: writing checkpoint step_1 into {full_disk / 'out'} needs about 0.1 MB" in err, err
    assert "Traceback" not in err
    assert not [p for p in (full_disk / "out").iterdir() if p.name.startswith("step_")]
