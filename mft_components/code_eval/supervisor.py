"""The supervisor: the one process that starts, times, kills and reaps a sandboxed program.

Run by the sandbox as ``python -I -S -c <this file's source> CONFIG_JSON`` in a session of its own (standard
library only). The evaluating process (the trainer) is never the program's parent: killing this supervisor ends
nothing else, and the program, in a session and process group of its own under another uid, cannot signal either.

    supervisor ──fork──> init (namespaces: pid 1 of a new pid namespace; mounts)
                          └─fork──> program: setsid, rlimits, cgroup, uid, exec(argv)

- ``namespaces``: ``unshare`` (ctypes: Python < 3.12 has no ``os.unshare``) of the mount, pid, network, ipc and
  uts namespaces (and the user namespace where this is not root). In the new mount namespace: a fresh ``/proc``
  (only the program's own processes), tmpfs over every ``hide`` path (homes, the checkout, output_dir, /tmp)
  with the ``expose`` paths (the interpreter, its libraries) bound back read-only and the run directory
  read-write, ``/etc/shadow`` as an empty file, every other mount remounted read-only. The network namespace
  holds only a loopback that is down. When init (pid 1) ends, the kernel kills whatever the program left.
- ``uid``: the program's uid and gid (the run directory is chowned to it); with ``no_new_privs`` set-uid programs
  gain nothing. After the run, a sweep running as that uid sends SIGKILL to all its processes (``kill(-1)``):
  a ``setsid`` daemon does not outlive its evaluation.

The report, one JSON line on stdout: ``returncode`` (negative: killed by that signal), ``timed_out``, ``error``
(a setup failure: the program never ran as asked) and ``seconds``.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}

libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def _under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _setup_mounts(cfg):
    """Inside the new mount namespace (as its root): hide, expose, a fresh /proc, the rest read-only."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    hide = [h for h in cfg["hide"] if os.path.isdir(h)]
    hide = [h for h in hide if not any(o != h and _under(h, o) for o in hide)]
    writable = cfg["writable"]
    keep = [(p, p in writable) for p in cfg["expose"] + writable
            if os.path.exists(p) and any(_under(p, h) for h in hide)]
    handles = [(os.open(p, os.O_PATH), p, rw) for p, rw in keep]  # reachable after the tmpfs covers them
    for h in hide:
        mode = "1777" if h in ("/tmp", "/var/tmp", "/dev/shm") else "755"
        _mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size=64m")
    for fd, p, rw in handles:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(p, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "a").close()
        _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        os.close(fd)
    for secret in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers"):
        if os.path.isfile(secret):
            _mount("/dev/null", secret, None, MS_BIND)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # Everything but the run directory and the private /tmp read-only (what the uid could not write anyway;
    # where this is not root, the user namespace's root could).
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = fields[4].replace("\\040", " ")
        if point == "/proc" or _under(point, "/proc") or any(_under(point, w) for w in writable):
            continue
        if point in ("/tmp", "/var/tmp", "/dev/shm") or point == "/dev" or _under(point, "/dev"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in fields[5].split(","):
            flags |= _MOUNT_FLAGS.get(opt, 0)
        libc.mount(None, point.encode(), None, ctypes.c_ulong(flags), None)  # best effort: locked mounts stay


def _enter_namespaces(cfg):
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if cfg["userns"]:
        flags |= CLONE_NEWUSER
    _check(libc.unshare(flags), "unshare")
    if cfg["userns"]:
        # This user keeps its uid inside: the namespace's creator holds every capability there (init mounts with
        # them), and the program, not uid 0 there, loses them at exec: it cannot undo the mounts.
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")


def _join(procs_file):
    with open(procs_file, "w") as f:
        f.write("0")


def _program(cfg, err_w):
    """In the forked child: limits, identity, exec. Never returns."""
    try:
        os.setsid()
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value, value))
        if cfg["nproc"] is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
        if cfg["cgroup"] and not cfg["namespaces"]:  # (init joined it: the filesystem is read-only now)
            _join(cfg["cgroup"])
        if cfg["uid"] is not None and not cfg["uid_in_driver"]:  # (bwrap, as root, binds first: the driver drops)
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid, which clears it
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        try:
            os.chdir(cfg["cwd"])
        except OSError as e:
            raise SetupError(f"run directory {cfg['cwd']}: {e.strerror}")
        out = cfg["out_fd"]
        os.dup2(out, 1)
        os.dup2(out, 2)
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd in cfg["pass_fds"]:
            os.set_inheritable(fd, True)
        try:
            os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
        except OSError as e:
            raise SetupError(f"cannot start {cfg['argv'][0]}: {e.strerror}")
    except BaseException as e:
        os.write(err_w, (str(e) if isinstance(e, SetupError) else f"{type(e).__name__}: {e}").encode()[:500])
    os._exit(127)


def _init(cfg, err_w, status_w):
    """pid 1 of the new namespaces: mounts, then the program; its wait status goes to the supervisor."""
    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if cfg["cgroup"]:
            _join(cfg["cgroup"])
        _setup_mounts(cfg)
    except BaseException as e:
        os.write(err_w, f"namespace setup: {e}".encode()[:500])
        os._exit(127)
    pid = os.fork()
    if pid == 0:
        _program(cfg, err_w)
    os.close(err_w)
    while True:  # reap everything; the program's status is what counts
        done, status = os.waitpid(-1, 0)
        if done == pid:
            os.write(status_w, str(status).encode())
            os._exit(0)


def _wait(pid, deadline):
    """The child's wait status, or None at the deadline."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            if pidfd is not None:
                os.close(pidfd)
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if pidfd is not None:
            select.select([pidfd], [], [], left)
        else:
            time.sleep(min(left, 0.01))


def _sweep(uid):
    """SIGKILL every process of the program's uid (it holds no other): daemons it started die with it."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(3):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.002)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _read_all(fd):
    out = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return out.decode(errors="replace")
        out += chunk


def main():
    cfg = json.loads(sys.argv[1])
    start = time.monotonic()
    report = {"returncode": None, "timed_out": False, "error": None}
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        if cfg["namespaces"]:
            _enter_namespaces(cfg)
        pid = os.fork()
        if pid == 0:
            os.close(err_r)
            os.close(status_r)
            if cfg["namespaces"]:
                _init(cfg, err_w, status_w)
            _program(cfg, err_w)
        os.close(err_w)
        os.close(status_w)
        for fd in cfg["pass_fds"] + [cfg["out_fd"]]:
            os.close(fd)
        status = _wait(pid, start + cfg["timeout"])
        if status is None:
            report["timed_out"] = True
            try:
                os.killpg(pid, signal.SIGKILL)  # the program's group (without namespaces its pid is its pgid)
            except OSError:
                pass
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
        error = _read_all(err_r)
        if cfg["namespaces"]:
            inner = _read_all(status_r)
            status = int(inner) if inner else None
        if error:
            report["error"] = error
        elif status is not None:
            report["returncode"] = os.waitstatus_to_exitcode(status)
        elif not report["timed_out"]:
            report["error"] = "the program's init process ended without its status"
    except SetupError as e:
        report["error"] = str(e)
    finally:
        # (in namespaces the kernel killed them with init; forking into that dead pid namespace would fail)
        if cfg["uid"] is not None and not cfg["namespaces"]:
            _sweep(cfg["uid"])
    report["seconds"] = time.monotonic() - start
    os.write(1, (json.dumps(report) + "\n").encode())


if __name__ == "__main__":
    main()
