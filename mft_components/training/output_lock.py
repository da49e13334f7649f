"""One run per ``output_dir``: an exclusive lock that the kernel releases when the process ends, however it ends.

    lock = lock_output_dir(output_dir)    # collective: rank 0 takes it, every rank stops if another run holds it
    ...                                   # the run: checkpoints, metrics, leftover cleanup
    lock.release()

Rank 0 takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``output_dir/.mft-run.lock`` before it writes anything there,
and writes who holds it (PID, host, start time, command) into the file. A second run on the same output_dir is
refused at once, naming that holder, on every one of its ranks; two runs can no longer interleave their
checkpoints and metrics, nor can one resume or clean up what the other is writing. Holding the lock, a run knows
that every ``step_N.tmp-*`` leftover is a dead process's (``checkpoint.remove_partial_checkpoints``).

The kernel drops a flock when the last descriptor of it closes: a killed run (``kill -9``, out of memory) leaves
the file but not the lock. The file is never deleted (deleting it would let two runs lock two different files of
one name). ``flock`` also works on NFSv4 and Lustre mounts shared by the nodes of a multi-node run (Linux maps it to
the server's byte-range locks).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mft_components.distributed import decided_by_rank0

__all__ = ["LOCK_FILE", "OutputDirBusy", "OutputDirLock", "lock_output_dir"]

LOCK_FILE = ".mft-run.lock"


class OutputDirBusy(RuntimeError):
    """Another live run holds the output directory's lock; the message names its PID, host and start time."""


class OutputDirLock:
    """The exclusive lock of one output directory (taken by :meth:`acquire`, held until :meth:`release` or the
    process ends).

    Args:
        output_dir: the run's output directory (created when missing).
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write this process's PID, host and start time into the file.

        Raises:
            OutputDirBusy: another process holds it (named from the file).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputDirBusy(self._busy_message()) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (the file stays); a no-op when not held."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _busy_message(self) -> str:
        holder = self._read_holder()
        who = "a process that has not written its name yet"
        if holder:
            who = (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
                   + (f" ({holder['command']})" if holder.get("command") else ""))
        return (f"output_dir {self.path.parent} is in use by another run: {who}; it holds {self.path}. Two runs in "
                f"one output_dir would mix their checkpoints and metrics: wait for that run to end (or stop it), or "
                f"choose another output_dir")

    def _read_holder(self) -> dict:
        # The holder writes its name right after locking: a reader that came in between waits a moment for it.
        for _ in range(20):
            try:
                text = self.path.read_text(encoding="utf-8").strip()
                if text:
                    return json.loads(text)
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return {}


def lock_output_dir(output_dir: str | os.PathLike) -> OutputDirLock:
    """Rank 0 locks ``output_dir``; collective under a process group, so that every rank learns whether it did.

    Returns:
        The lock (held on rank 0; ranks other than 0 hold nothing and release nothing).

    Raises:
        OutputDirBusy: on every rank, when another run holds it.
    """
    lock = OutputDirLock(output_dir)
    decided_by_rank0(lock.acquire, errors=(OutputDirBusy,))  # runs on rank 0 only
    return lock
