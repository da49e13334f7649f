"""What a sandboxed program may see and who it runs as: the uid pool, the paths hidden and exposed, bubblewrap's
arguments.

- uid: where the evaluation runs as root, each program runs as a uid of its own from ``UID_RANGE`` (64000-64999),
  held with an ``flock`` for the run so that concurrent evaluations (other ranks, other jobs) never share one: a
  program cannot signal, ptrace or read (``/proc/PID/environ``) the trainer's processes or another program's, nor
  write what root owns. Uids that ``/etc/passwd`` names are skipped.
- hidden: the homes (``/root``, ``/home``, ``$HOME``), the checkout mft runs from, the trainer's working directory,
  a run's ``output_dir`` (``Sandbox.hide``) and the shared temporary directories; ``/etc/shadow`` reads as empty.
- exposed again (read-only): what the eval interpreter needs, its prefixes and ``site-packages`` (asked from the
  interpreter itself): the shared venv's interpreter lives under ``/root``, mode 0700, which another uid could
  not even execute; the mount namespace (or bubblewrap) binds just those directories back into the tmpfs over
  ``/root``. The run directory is bound back read-write.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import random
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

__all__ = ["UID_RANGE", "UidLease", "tasks_of", "namespaces_problem", "interpreter_paths", "hidden_paths", "reachable_by_others", "bwrap_arguments"]

UID_RANGE = range(64000, 65000)
# never hidden, whatever the homes or the checkout are: the system the interpreter runs on
_SYSTEM = {"/", "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/opt", "/proc", "/sys", "/dev", "/var",
           "/run", "/srv", "/mnt"}
_SHARED_TMP = ["/tmp", "/var/tmp", "/dev/shm"]


class UidLease:
    """An unprivileged uid held for one run (``with UidLease() as uid``); its lock file is released after."""

    def __init__(self):
        self.uid: int | None = None
        self._fd: int | None = None

    @staticmethod
    def _lock_dir() -> Path:
        for base in ("/run", tempfile.gettempdir()):
            d = Path(base) / f"mft-sandbox-uids-{os.geteuid()}"
            try:
                d.mkdir(mode=0o700, exist_ok=True)
                st = os.lstat(d)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
                return d
        raise OSError("no private directory for the sandbox's uid locks (/run or the temporary directory)")

    def __enter__(self) -> int:
        d = self._lock_dir()
        uids = list(UID_RANGE)
        start = random.randrange(len(uids))
        for uid in uids[start:] + uids[:start]:
            try:
                pwd.getpwuid(uid)
                continue  # a real account: not ours to use
            except KeyError:
                pass
            fd = os.open(d / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return uid
        raise OSError(f"every sandbox uid {UID_RANGE.start}-{UID_RANGE.stop - 1} is in use")

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def interpreter_paths(python: str) -> list[str]:
    """The directories the eval interpreter reads: its prefixes, its binary's directory and the ``site-packages``
    (or other) entries of its ``sys.path`` under those; the fewest directories that hold them all."""
    code = ("import json, os, sys, sysconfig\n"
            "paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,\n"
            "         os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(sys.executable)}\n"
            "paths |= {p for p in sys.path if p and ('site-packages' in p or 'dist-packages' in p)}\n"
            "paths |= {v for k, v in sysconfig.get_paths().items() if k in ('stdlib', 'platstdlib', 'purelib', 'platlib')}\n"
            "print(json.dumps(sorted(paths)))\n")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    if out.returncode != 0:
        raise OSError(f"{python} cannot run: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    paths = sorted({os.path.abspath(p) for p in json.loads(out.stdout) if os.path.exists(p)})
    return [p for p in paths if not any(q != p and _under(p, q) for q in paths)]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def hidden_paths(extra: list[str] | tuple = ()) -> list[str]:
    """Directories a program must not see: homes, the checkout, the working directory, ``extra`` (output_dir), the
    shared temporary directories (a private one replaces them)."""
    checkout = Path(__file__).resolve().parents[2]
    candidates = ["/root", "/home", os.path.expanduser("~"), os.getcwd(), *map(str, extra), *_SHARED_TMP]
    if (checkout / "pyproject.toml").is_file() or (checkout / ".git").exists():
        candidates.append(str(checkout))
    out = []
    for c in candidates:
        c = os.path.realpath(c)
        if c not in _SYSTEM and c not in out and os.path.isdir(c):
            out.append(c)
    return out


def reachable_by_others(paths: list[str]) -> bool:
    """True when a user other than the owner may traverse to (and read) each path: e.g. the interpreter."""
    for p in paths:
        p = os.path.realpath(p)
        parts = Path(p).parents
        for d in [*reversed(parts), Path(p)]:
            try:
                mode = os.stat(d).st_mode
            except OSError:
                return False
            need = 0o005 if stat.S_ISDIR(mode) else 0o004
            if mode & need != need:
                return False
    return True


def bwrap_arguments(hide: list[str], expose: list[str], run_dir: str,
                    driver_enters: bool = False) -> list[str] | None:
    """bubblewrap's arguments up to the program: ``/`` read-only, the hidden paths as empty tmpfs with the exposed
    ones bound back, the run directory writable, no network, own pid / ipc / uts namespaces; None where not
    installed. ``driver_enters``: started as root, the harness driver becomes the program's uid and enters
    ``run_dir`` itself."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    top = [h for h in hide if not any(o != h and _under(h, o) for o in hide)]
    for h in top:
        # the shared temporary directories as the namespaces mode makes them: writable by every uid, sticky
        args += ["--perms", "1777" if h in _SHARED_TMP else "0755", "--tmpfs", h]
    made: set[str] = set()

    def parents(path: str) -> list[str]:
        # bubblewrap makes a bind target's missing parents mode 0700, which the program's uid cannot traverse
        root = next((h for h in top if _under(path, h)), None)
        if root is None:
            return []
        out, d = [], os.path.dirname(path)
        while d != root and _under(d, root) and d not in made:
            made.add(d)
            out.append(d)
            d = os.path.dirname(d)
        return [a for d in reversed(out) for a in ("--perms", "0755", "--dir", d)]

    for p in expose:
        if any(_under(p, h) for h in top):
            args += [*parents(p), "--ro-bind", p, p]
    for secret in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers"):
        if os.path.isfile(secret):
            args += ["--ro-bind", "/dev/null", secret]
    # the tmpfs over homes, the checkout and output_dir read-only once the binds are in (where this is not root,
    # the program's own uid owns them), as the namespaces mode remounts them; /tmp and co. stay writable
    read_only = [a for h in top if h not in _SHARED_TMP for a in ("--remount-ro", h)]
    if driver_enters:
        # bubblewrap started as root, the driver drops to the program's uid: no user namespace (--unshare-all's
        # would map only uid 0, and setuid to the program's uid would fail there); and no --chdir: bubblewrap
        # changes directory with its capabilities dropped, which the run directory (mode 0700, the program's
        # uid's) refuses; the driver enters it once it is that uid
        unshare = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        return args + [*parents(run_dir), "--bind", run_dir, run_dir, *read_only, "--chdir", "/", *unshare,
                       "--die-with-parent", "--new-session"]
    return args + [*parents(run_dir), "--bind", run_dir, run_dir, *read_only, "--chdir", run_dir, "--unshare-all",
                   "--die-with-parent", "--new-session"]


def tasks_of(uid: int) -> int:
    """Tasks (threads) the kernel counts for ``uid`` now: RLIMIT_NPROC must allow those plus the program's."""
    tasks = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except (OSError, ValueError):
            continue
        if status.get("Uid", "").split()[:1] == [str(uid)]:
            tasks += int(status.get("Threads", "1"))
    return tasks


def namespaces_problem(python: str) -> str | None:
    """Why ``isolation: namespaces`` cannot start here (None: ``unshare`` of the namespaces it needs works), for
    ``mft validate``; a child process tries, so that this one stays where it is."""
    code = ("import ctypes, os, sys\n"
            "flags = 0x00020000 | 0x04000000 | 0x08000000 | 0x20000000 | 0x40000000\n"
            "flags |= 0x10000000 if os.geteuid() != 0 else 0\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "if libc.unshare(flags) != 0:\n"
            "    sys.exit('unshare: ' + os.strerror(ctypes.get_errno()))\n")
    try:
        out = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{python} cannot run: {e}"
    return None if out.returncode == 0 else (out.stderr.strip().splitlines() or ["unshare failed"])[-1]
