"""Run untrusted programs (a model's code plus its tests) so that whatever they do costs their own run only.

Each program runs in a separate interpreter (``python``, the eval interpreter, which need not be the training
one), in a fresh temporary directory that is also its ``HOME`` and ``TMPDIR``, with::

    a minimal environment        no inherited variables (no tokens, no keys): PATH, HOME, TMPDIR, LANG and a few
                                 settings that make runs reproducible (PYTHONHASHSEED=0, MPLBACKEND=Agg, ...)
    a wall-clock timeout         then its whole process group is killed (it runs in a session of its own)
    rlimits                      CPU seconds, address space (memory), file size (and output size)
    a process-count limit        a pids cgroup per run where one is writable (pids.max counts every process
                                 and thread, also for root); else RLIMIT_NPROC, which the kernel enforces for
                                 users other than root only
    bubblewrap, where present    (``bwrap``) the filesystem read-only except the program's directory, no
                                 network, own pid / ipc / uts namespaces; the sandbox dies with its parent

    sandbox process tree:   python -I -S -c BOOT   sets the rlimits, joins the cgroup, then exec()s
                              -> bwrap ... (optional)
                                 -> python program.py   (cwd = HOME = TMPDIR = the fresh directory)

A :class:`Sandbox` probes what the machine allows once and says which isolation it used (``.isolation``), so a
run's report tells whether its verdicts came from a bubblewrap sandbox or from rlimits alone. The rlimits are set
by that small bootstrap in the child, not by ``preexec_fn``, which is unsafe in a multi-threaded training process.

Programs pass when they exit with status 0 within the time limit: the suites put their tests in the program so
that a failing test, an exception or a crash is a non-zero exit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Limits", "RunResult", "Sandbox", "SandboxError", "ISOLATIONS"]

ISOLATIONS = ("auto", "bwrap", "process")

# Runs inside the eval interpreter (python -I -S: no site, no environment): limits first, then exec the program.
_BOOT = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["nproc"] is not None:  # not root: the kernel counts every task of this user, so allow what runs already
    tasks = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except (OSError, ValueError):
            continue
        if status.get("Uid", "").split()[:1] == [str(os.getuid())]:
            tasks += int(status.get("Threads", "1"))
    resource.setrlimit(resource.RLIMIT_NPROC, (tasks + cfg["nproc"], tasks + cfg["nproc"]))
if cfg["cgroup"]:
    with open(cfg["cgroup"], "w") as f:
        f.write(str(os.getpid()))
os.execv(cfg["argv"][0], cfg["argv"])
"""

_SIGNAL_REASONS = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGXFSZ: "file size limit exceeded",
    signal.SIGKILL: "killed",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
}


class SandboxError(RuntimeError):
    """The eval interpreter cannot run, or the requested isolation is not available here."""


@dataclass(frozen=True)
class Limits:
    """Per-program limits.

    Args:
        timeout_s: wall-clock seconds before the process group is killed.
        memory_mb: address-space limit (RLIMIT_AS); None: unlimited.
        max_processes: processes and threads the program may add (pids cgroup or RLIMIT_NPROC).
        file_size_mb: largest file it may write, its output included (RLIMIT_FSIZE).
        cpu_s: CPU seconds (RLIMIT_CPU); None: twice the timeout plus one.
        output_chars: how much of the end of its output is kept in the result.
    """

    timeout_s: float = 10.0
    memory_mb: int | None = 4096
    max_processes: int = 64
    file_size_mb: int = 64
    cpu_s: float | None = None
    output_chars: int = 4000


@dataclass
class RunResult:
    """One program's verdict: ``status`` is ``passed``, ``failed`` or ``timeout``; ``reason`` says why in a line."""

    status: str
    reason: str
    returncode: int | None
    output: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "returncode": self.returncode,
                "seconds": round(self.seconds, 3), "output": self.output}


class Sandbox:
    """Runs programs in isolation, ``workers`` at a time.

    Args:
        python: the eval interpreter (default: this one). A suite's libraries (pandas, polars, ...) must be
            importable by it.
        workers: programs run in parallel.
        limits: per-program :class:`Limits`.
        isolation: ``auto`` (bubblewrap when it works here, else processes with rlimits), ``bwrap`` (required),
            ``process`` (never bubblewrap).
        env: extra environment variables for every program.

    Raises:
        SandboxError: the interpreter does not run, or ``isolation="bwrap"`` where bubblewrap cannot run.
    """

    def __init__(self, python: str | os.PathLike | None = None, workers: int = 2, limits: Limits = Limits(),
                 isolation: str = "auto", env: dict[str, str] | None = None):
        if isolation not in ISOLATIONS:
            raise SandboxError(f"isolation: expected one of {', '.join(ISOLATIONS)}, got {isolation!r}")
        self.python = _resolve_python(python)
        self.workers = max(1, int(workers))
        self.limits = limits
        self.extra_env = dict(env or {})
        self._cgroup = _PidsCgroup.create()
        self._counter = 0
        self._lock = threading.Lock()
        self.bwrap_failure: str | None = None
        self.bwrap = _bwrap_command() if isolation != "process" else None
        if self.bwrap is None and isolation == "bwrap":
            raise SandboxError("isolation: bwrap: `bwrap` is not installed (Debian/Ubuntu: apt-get install "
                               "bubblewrap); use isolation: process or auto")
        if self.bwrap is None and isolation == "auto":
            self.bwrap_failure = "bwrap is not installed"
        probe = self._run_one("import sys; sys.exit(0)", {}, probe=True)
        if not probe.passed and self.bwrap is not None:
            # bubblewrap is installed but cannot run here (e.g. user namespaces are disabled)
            self.bwrap_failure = (probe.output.strip().splitlines() or [probe.reason])[-1][:200]
            if isolation == "bwrap":
                raise SandboxError(f"isolation: bwrap: bubblewrap cannot run here: {self.bwrap_failure}; use "
                                   f"isolation: process or auto")
            self.bwrap = None
            probe = self._run_one("import sys; sys.exit(0)", {}, probe=True)
        if not probe.passed:
            raise SandboxError(f"python: {self.python} cannot run a program in the sandbox: {probe.reason}\n"
                               f"{probe.output.strip()[-500:]}")

    # ------------------------------------------------------------------------------------------------- report

    @property
    def isolation(self) -> str:
        """One line saying how programs are isolated here (printed by every evaluation)."""
        parts = ["bubblewrap (read-only filesystem but the program's directory, no network, own pid namespace)"
                 if self.bwrap else f"separate process ({self.bwrap_failure or 'bubblewrap not used'}): programs "
                                    f"read, write and reach the network as this user can"]
        if self._cgroup is not None:
            parts.append(f"pids cgroup ({self.limits.max_processes} tasks)")
        elif os.geteuid() != 0:
            parts.append(f"RLIMIT_NPROC (+{self.limits.max_processes} tasks)")
        else:
            parts.append("no process-count limit (root, no writable pids cgroup)")
        lim = self.limits
        parts.append(f"timeout {lim.timeout_s:g}s, memory {lim.memory_mb or 'unlimited'} MB, "
                     f"file size {lim.file_size_mb} MB, minimal environment")
        return "; ".join(parts)

    @property
    def limits_processes(self) -> bool:
        """True when the process count is capped by something the kernel enforces here."""
        return self._cgroup is not None or os.geteuid() != 0

    # ---------------------------------------------------------------------------------------------------- run

    def run(self, program: str, env: dict[str, str] | None = None) -> RunResult:
        """Run one Python program (its source) and return its verdict."""
        return self._run_one(program, env or {})

    def run_many(self, programs: list[str], env: dict[str, str] | None = None) -> list[RunResult]:
        """Run programs ``workers`` at a time; results in the order of ``programs``."""
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.workers, len(programs))) as pool:
            return list(pool.map(lambda p: self._run_one(p, env or {}), programs))

    def close(self) -> None:
        """Remove this sandbox's cgroup (runs clean up their own directories)."""
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---------------------------------------------------------------------------------------------- internals

    def _environment(self, home: str, env: dict[str, str]) -> dict[str, str]:
        bindir = str(Path(self.python).parent)
        return {
            "PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            # reproducible and headless; polars sizes its thread pool (and address space) by core count otherwise
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
            "MPLCONFIGDIR": home, "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "8",
            **self.extra_env, **env,
        }

    def _rlimits(self) -> dict[str, int]:
        lim = self.limits
        cpu = lim.cpu_s if lim.cpu_s is not None else 2 * lim.timeout_s + 1
        out = {"RLIMIT_CPU": int(cpu + 0.999), "RLIMIT_FSIZE": lim.file_size_mb * 2**20, "RLIMIT_CORE": 0}
        if lim.memory_mb:
            out["RLIMIT_AS"] = lim.memory_mb * 2**20
        return out

    def _run_one(self, program: str, env: dict[str, str], probe: bool = False) -> RunResult:
        with self._lock:
            self._counter += 1
            run_id = self._counter
        home = tempfile.mkdtemp(prefix="mft-sandbox-")
        cgroup = None
        start = time.perf_counter()
        try:
            cgroup = self._cgroup.child(run_id, self.limits.max_processes) if self._cgroup is not None else None
            Path(home, "program.py").write_text(program, encoding="utf-8")
            argv = [self.python, "program.py"]
            if self.bwrap:
                argv = [*self.bwrap, "--bind", home, home, "--chdir", home, *argv]
            boot = {"rlimits": self._rlimits(), "argv": argv, "cgroup": cgroup.procs_file if cgroup else None,
                    "nproc": self.limits.max_processes if cgroup is None and os.geteuid() != 0 else None}
            with tempfile.TemporaryFile() as out:
                proc = subprocess.Popen([self.python, "-I", "-S", "-c", _BOOT, json.dumps(boot)], cwd=home,
                                        env=self._environment(home, env), stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                timeout = self.limits.timeout_s + (10.0 if probe else 0.0)
                try:
                    returncode = proc.wait(timeout=timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                # Whatever it left behind (background children, a fork bomb) goes with it.
                _kill_group(proc.pid)
                if cgroup is not None:
                    cgroup.kill_all()
                if timed_out:
                    returncode = proc.wait()
                size = out.seek(0, os.SEEK_END)
                out.seek(max(0, size - 4 * self.limits.output_chars))
                output = out.read().decode("utf-8", errors="replace")[-self.limits.output_chars:]
        finally:
            if cgroup is not None:
                cgroup.remove()
            _remove_tree(home)
        seconds = time.perf_counter() - start
        if timed_out:
            return RunResult("timeout", f"timed out after {self.limits.timeout_s:g} s", None, output, seconds)
        if returncode == 0:
            return RunResult("passed", "passed", 0, output, seconds)
        reason = _failure_reason(returncode, output)
        if size >= self.limits.file_size_mb * 2**20:  # Python ignores SIGXFSZ: its write fails instead
            reason = f"output reached the file size limit ({self.limits.file_size_mb} MB)"
        return RunResult("failed", reason, returncode, output, seconds)


def _remove_tree(path: str) -> None:
    """Remove a run's directory, also where the program made some of its directories read-only or unsearchable
    (for a user other than root they would stay behind, one per run): those are given back to their owner, this
    user, and removed. Symlinks are never followed."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    stack = [path]
    while stack:  # a loop, not recursion: the program chose the depth
        d = stack.pop()
        try:
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                continue
            os.chmod(d, 0o700)
            stack += [e.path for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
    shutil.rmtree(path, ignore_errors=True)


def _failure_reason(returncode: int, output: str) -> str:
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"{_SIGNAL_REASONS.get(sig, 'killed by a signal')} ({name})"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    # the exception line of a traceback, or the last line (unittest's FAILED (failures=N))
    exc = next((line for line in reversed(lines) if line.split(":", 1)[0].endswith(("Error", "Exception", "Exit"))
                and " " not in line.split(":", 1)[0]), None)
    return f"exit status {returncode}: {(exc or (lines[-1] if lines else 'no output'))[:200]}"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _resolve_python(python: str | os.PathLike | None) -> str:
    if python is None:
        return sys.executable
    found = shutil.which(str(python))
    if found is None:
        raise SandboxError(f"python: {python} is not an executable interpreter")
    # absolute, but not resolved: a venv's python must stay the venv's (its symlink decides sys.prefix)
    return os.path.abspath(found)


def _bwrap_command() -> list[str] | None:
    """bubblewrap arguments up to the program (without its writable directory), or None when not installed."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/dev/shm",
            "--unshare-all", "--die-with-parent", "--new-session"]


class _PidsCgroup:
    """A pids cgroup for this sandbox, with one child per run (its pids.max is the run's process limit).

    Works where this process may create cgroups: cgroup v1's pids hierarchy, or a cgroup v2 subtree with the pids
    controller (e.g. a container's root cgroup). Elsewhere :meth:`create` returns None.
    """

    PREFIX = "mft-sandbox-"

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls) -> "_PidsCgroup | None":
        for base in _own_pids_cgroups():
            cls._remove_stale(base)
            path = base / f"{cls.PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                path.mkdir()
            except OSError:
                continue
            group = cls(path)
            try:
                probe = _RunCgroup(path / "probe", max_processes=1)
                probe.remove()
                return group
            except OSError:
                pass
            try:  # cgroup v2: the controller must be enabled for children first
                (path / "cgroup.subtree_control").write_text("+pids")
                _RunCgroup(path / "probe", max_processes=1).remove()
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

    def child(self, run_id: int, max_processes: int) -> "_RunCgroup":
        return _RunCgroup(self.path / f"run-{run_id}", max_processes)

    def remove(self) -> None:
        for child in self.path.glob("run-*"):
            _RunCgroup(child).remove()
        try:
            self.path.rmdir()
        except OSError:
            pass


class _RunCgroup:
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


def _own_pids_cgroups() -> list[Path]:
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
