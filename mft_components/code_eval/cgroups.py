"""Pids cgroups for sandboxed programs: one per sandbox, a child per run whose ``pids.max`` caps the run's tasks.

``pids.max`` counts every process and thread, also for root; it works where this process may create cgroups
(cgroup v1's pids hierarchy, or a cgroup v2 subtree with the pids controller). Elsewhere the sandbox falls back on
RLIMIT_NPROC, which the kernel enforces for users other than root only.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

__all__ = ["PidsCgroup", "RunCgroup"]


class PidsCgroup:
    """A pids cgroup for this sandbox, with one child per run (its pids.max is the run's process limit).

    Works where this process may create cgroups: cgroup v1's pids hierarchy, or a cgroup v2 subtree with the pids
    controller (e.g. a container's root cgroup). Elsewhere :meth:`create` returns None.
    """

    PREFIX = "mft-sandbox-"

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls) -> "PidsCgroup | None":
        for base in own_pids_cgroups():
            cls._remove_stale(base)
            path = base / f"{cls.PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                path.mkdir()
            except OSError:
                continue
            group = cls(path)
            try:
                probe = RunCgroup(path / "probe", max_processes=1)
                probe.remove()
                return group
            except OSError:
                pass
            try:  # cgroup v2: the controller must be enabled for children first
                (path / "cgroup.subtree_control").write_text("+pids")
                RunCgroup(path / "probe", max_processes=1).remove()
                return group
            except OSError:
                group.remove()
        return None

    @classmethod
    def _remove_stale(cls, base: Path) -> None:
        """Cgroups left by sandboxes of processes that died without closing them."""
        for path in base.glob(f"{cls.PREFIX}*"):
            try:
                pid = int(path.name[len(cls.PREFIX):].split("-")[0])
                os.kill(pid, 0)
            except ProcessLookupError:
                cls(path).remove()
            except (ValueError, PermissionError):
                pass

    def child(self, run_id: int, max_processes: int) -> "RunCgroup":
        return RunCgroup(self.path / f"run-{run_id}", max_processes)

    def remove(self) -> None:
        for child in self.path.glob("run-*"):
            RunCgroup(child).remove()
        try:
            self.path.rmdir()
        except OSError:
            pass


class RunCgroup:
    """One run's cgroup: created with its pids.max when ``max_processes`` is given, else an existing one."""

    def __init__(self, path: Path, max_processes: int | None = None):
        self.path = path
        if max_processes is not None:
            path.mkdir()
            try:
                (path / "pids.max").write_text(str(max_processes))
            except OSError:
                path.rmdir()
                raise

    @property
    def procs_file(self) -> str:
        return str(self.path / "cgroup.procs")

    def kill_all(self) -> None:
        """SIGKILL every task in the cgroup; nothing new can start meanwhile (pids.max 0)."""
        try:
            (self.path / "pids.max").write_text("0")
        except OSError:
            pass
        for _ in range(1000):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    def remove(self) -> None:
        self.kill_all()
        for _ in range(1000):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # the killed tasks are still exiting
                time.sleep(0.005)


def own_pids_cgroups() -> list[Path]:
    """Directories of this process's pids cgroup: the v1 pids hierarchy's, then cgroup v2's."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return []
    own = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        own[controllers] = path.lstrip("/")
    out = []
    for m in mounts:
        if len(m) < 4:
            continue
        if m[2] == "cgroup" and "pids" in m[3].split(",") and any("pids" in c.split(",") for c in own):
            key = next(c for c in own if "pids" in c.split(","))
            out.append(Path(m[1]) / own[key])
        elif m[2] == "cgroup2" and "" in own:
            d = Path(m[1]) / own[""]
            try:
                if "pids" in (d / "cgroup.controllers").read_text().split():
                    out.append(d)
            except OSError:
                pass
    return out
