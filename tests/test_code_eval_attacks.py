"""Answers that try to fool the verdict or escape the sandbox (issue 21), through the path model answers take
(``Problem.program`` -> ``Sandbox``), in every isolation mode this machine offers.

Each attack is one test: its verdict is "failed" (or "timeout") with the reason, and the trainer (this process),
a correct program running beside it and the files outside its run directory are untouched. The attacks of a mode
run together in one batch (``workers`` at a time, so that killers and their would-be victims overlap); a mode that
cannot start here is skipped naming why, and so is an attack that a mode does not claim to stop (``process`` run
as root, where the eval interpreter is not readable by another uid: nothing keeps such a program from the trainer).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from mft_components.code_eval import suites
from mft_components.code_eval.sandbox import Limits, Sandbox, SandboxError

LIMITS = Limits(timeout_s=6, memory_mb=1024, max_processes=32, file_size_mb=4)
CHECKOUT = Path(__file__).resolve().parents[1]
MARKER = f"mft-attack-{uuid.uuid4().hex[:12]}"
SECRET = f"secret-{uuid.uuid4().hex}"
UNITTEST_TEST = ("import unittest\nclass T(unittest.TestCase):\n    def test_f(self):\n        self.assertEqual(f(), 1)\n"
                 "    def test_g(self):\n        self.assertEqual(f() + 1, 2)\n")
WRONG = "def f():\n    return 2\n"


@dataclass
class Attack:
    name: str
    harness: str        # check (HumanEval/0), unittest, dataframebench or script
    code: str           # the answer's code (for check: the completion after the prompt)
    reason: str         # what the failure's reason starts with
    contains: str = ""  # which isolation stops it: "" (the verdict, every mode), "uid" (another uid or namespaces),
    status: str = "failed"  # "ns" (namespaces: network, mounts)


ATTACKS = [
    Attack("posix_exit", "check", "    import posix\n    posix._exit(0)\n", "exited with status 0 before the tests"),
    Attack("execv_true", "check", "    import os\n    os.execv('/bin/true', ['true'])\n", "exited with status 0"),
    Attack("main_module_exit", "check", "    import sys\n    sys.modules['__main__']._exit(0)\n",
           "AttributeError: module '__main__' has no attribute '_exit'"),
    Attack("patched_main_exit", "check", "    import __main__, os\n    __main__._exit = os._exit\n"
           "    __main__._exit(0)\n", "exited with status 0"),
    Attack("ctypes_exit", "check", "    import ctypes\n    ctypes.CDLL(None).exit(0)\n", "exited with status 0"),
    Attack("flush_exits", "check", "    import os, sys\n    class Out:\n        def write(self, s):\n"
           "            return len(s)\n        def flush(self):\n            os._exit(0)\n    sys.stdout = Out()\n"
           "    return []\n", "AssertionError"),
    Attack("frame_walk", "check", "    import sys\n    f = sys._getframe()\n    while f is not None:\n"
           "        for v in list(f.f_locals.values()):\n            if isinstance(v, list):\n"
           "                v.append('passed')\n        f = f.f_back\n    return []\n", "AssertionError"),
    Attack("forged_verdict", "check", "    import os\n    for fd in range(3, 64):\n        try:\n"
           "            os.write(fd, b'0' * 64 + b'\\tpassed\\t9\\t0\\t0\\t0\\tpassed\\n')\n        except OSError:\n"
           "            pass\n    os._exit(0)\n", "exited with status 0"),
    Attack("unittest_sys_exit", "unittest", WRONG + "import sys\nsys.exit(0)\n", "SystemExit(0) before the tests"),
    Attack("dataframebench_sys_exit", "dataframebench", WRONG + "import sys\nsys.exit(0)\n", "SystemExit(0)"),
    Attack("patched_unittest", "unittest", WRONG + "import unittest\nunittest.TestCase.run = "
           "lambda self, result=None: result.testsRun.__class__\nunittest.main = lambda *a, **k: None\n",
           "tests: 2 run, 2 failed"),
    Attack("patched_setup_skips", "unittest", WRONG + "import unittest\nunittest.TestCase.setUp = "
           "lambda self: self.skipTest('no')\n", "tests: 2 run, 2 failed"),
    Attack("skipped_tests", "unittest", "import unittest\ndef f():\n    raise unittest.SkipTest('skip me')\n",
           "tests: 2 run, 0 failed, 0 errors, 2 skipped"),
    Attack("deleted_assertions", "unittest", WRONG + "import unittest\ndel unittest.TestCase.assertEqual\n",
           "tests: 2 run, 2 failed"),
    Attack("patched_builtins_in_tests", "unittest", "import builtins\ndef f():\n    builtins.len = lambda x: 0\n"
           "    builtins.isinstance = lambda *a: False\n    return 2\n", "tests: 2 run, 2 failed"),
    Attack("patched_unittest_in_tests", "unittest", "import unittest\ndef f():\n"
           "    unittest.TestResult.addFailure = lambda *a: None\n    unittest.TestCase.run = "
           "lambda self, result=None: result.addSuccess(self)\n    return 2\n", "tests: 2 run, 2 failed"),
    Attack("script_sys_exit", "script", WRONG + "import sys\nsys.exit(0)\n", "SystemExit(0)"),
    Attack("read_trainer_environ", "script", "import os\nfound = []\nfor pid in os.listdir('/proc'):\n    try:\n"
           "        if b'" + SECRET + "' in open(f'/proc/{pid}/environ', 'rb').read():\n            found.append(pid)\n"
           "    except OSError:\n        pass\nassert found, 'no secret'\n", "AssertionError: no secret", "uid"),
    Attack("kill_parent", "script", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
           f"os.kill({os.getpid()}, signal.SIGKILL)\n" + WRONG + "assert f() == 1\n", "", "uid"),
    Attack("kill_everything", "script", "import os, signal, time\nend = time.time() + 2\nwhile time.time() < end:\n"
           "    for pid in os.listdir('/proc'):\n        if pid.isdigit() and int(pid) != os.getpid():\n"
           "            try:\n                os.kill(int(pid), signal.SIGKILL)\n            except OSError:\n"
           "                pass\n    try:\n        os.kill(-1, signal.SIGKILL)\n    except OSError:\n        pass\n"
           "    time.sleep(0.05)\nassert False, 'survived'\n", "AssertionError: survived", "uid"),
    Attack("write_outside", "script", f"import os\nfor d in [{str(CHECKOUT)!r}, '/root', os.path.expanduser('~root')]:\n"
           f"    try:\n        open(os.path.join(d, {MARKER!r}), 'w').write('x')\n    except OSError:\n        pass\n"
           "assert False, 'wrote what it could'\n", "AssertionError: wrote what it could", "uid"),
    Attack("write_shared_tmp", "script", f"import os\nfor d in ['/tmp', '/var/tmp', '/dev/shm']:\n    try:\n"
           f"        open(os.path.join(d, {MARKER!r}), 'w').write('x')\n    except OSError:\n        pass\n"
           "assert False, 'wrote what it could'\n", "AssertionError: wrote what it could", "ns"),
    Attack("tcp_to_trainer", "script", "import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=2)\n"
           f"s.sendall(b{MARKER!r})\n", "", "ns"),
    Attack("fork_bomb", "script", "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
           "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
           "assert False, f'forked {n}'\n", "AssertionError: forked"),
    Attack("setsid_daemon", "script", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.0)\n"
           f"    open('/tmp/{MARKER}-daemon', 'w').write('x')\n    os._exit(0)\n" + WRONG + "assert f() == 1\n",
           "AssertionError", "uid"),
]
SIBLING = "import time\ntime.sleep(1.5)\nassert sum(range(4)) == 6\n"


def _program(attack: Attack, port: int):
    code = attack.code.replace("PORT", str(port))
    if attack.harness == "check":
        problem = suites.humaneval_problems()[0]  # has_close_elements: check() fails on a wrong answer
        return problem.program(code)
    harness = {"unittest": "unittest", "dataframebench": "dataframebench", "script": "script"}[attack.harness]
    test = UNITTEST_TEST if harness != "script" else ""
    problem = suites.Problem("attack", [{"role": "user", "content": "f"}], test or "pass", harness)
    return problem.program(code)


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except (OSError, ValueError):
            continue
    return found


def _outside_files() -> list[Path]:
    return [p for d in (CHECKOUT, Path("/root"), Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))
            for p in (d / MARKER, d / f"{MARKER}-daemon") if p.exists()]


# "process-uid": isolation process with an interpreter another uid may run (the system's, where there is one),
# so that this machine, root with its venv under /root, also shows what the uid alone contains.
SYSTEM_PYTHON = "/usr/bin/python3"


def _batch(mode: str) -> dict:
    try:
        if mode == "process-uid":
            if not os.access(SYSTEM_PYTHON, os.X_OK) or os.geteuid() != 0:
                return {"skip": f"needs root and {SYSTEM_PYTHON}"}
            sandbox = Sandbox(python=SYSTEM_PYTHON, workers=4, limits=LIMITS, isolation="process")
            if not sandbox.uid_switch:
                sandbox.close()
                return {"skip": f"{SYSTEM_PYTHON} cannot run as another uid here: {sandbox.uid_reason}"}
        else:
            sandbox = Sandbox(workers=4, limits=LIMITS, isolation=mode)
    except SandboxError as e:
        return {"skip": f"isolation {mode} cannot start here: {e}"}
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    os.environ["MFT_ATTACK_SECRET"] = SECRET
    parent = os.getppid()
    try:
        why = {a.name: _contained(sandbox, a) for a in ATTACKS}
        runnable = [a for a in ATTACKS if why[a.name] is None]
        runnable.sort(key=lambda a: not a.name.startswith("kill"))  # the killers start beside the sibling
        programs = [_program(a, port) for a in runnable]
        results = sandbox.run_many([SIBLING, *programs], env={"MFT_MARK": MARKER})
        time.sleep(1.5)  # a daemon that survived would have written its file by now
        received = []
        try:
            while True:
                conn, _ = server.accept()
                conn.settimeout(1)
                received.append(conn.recv(100))
                conn.close()
        except (BlockingIOError, OSError):
            pass
    finally:
        del os.environ["MFT_ATTACK_SECRET"]
        server.close()
        sandbox.close()
    return {"why": why, "results": dict(zip([a.name for a in runnable], results[1:])), "sibling": results[0],
            "received": received, "parent": parent, "leftover": _processes_with(MARKER), "files": _outside_files()}


def _contained(sandbox: Sandbox, attack: Attack) -> str | None:
    """Why ``sandbox`` does not claim to stop ``attack`` (None: it does)."""
    isolated = sandbox.mode in ("namespaces", "bwrap")
    if attack.contains == "uid" and not (isolated or sandbox.uid_switch or os.geteuid() != 0):
        return (f"isolation {sandbox.mode} here runs programs as root ({sandbox.uid_reason or 'no uid switch'}): "
                "nothing keeps them from the trainer")
    if attack.contains == "uid" and attack.name == "kill_everything" and not (isolated or sandbox.uid_switch):
        return "kill(-1) as this user would reach this user's processes"
    if attack.contains == "ns" and not isolated:
        return f"isolation {sandbox.mode} has no network or mount namespace"
    if attack.harness == "dataframebench" and sandbox.python == SYSTEM_PYTHON:
        return f"{SYSTEM_PYTHON} has no matplotlib"
    if attack.name == "fork_bomb" and not sandbox.limits_processes:
        return "no process-count limit the kernel enforces here"
    return None


@pytest.fixture(scope="module")
def batches():
    return {}


@pytest.mark.parametrize("mode", ["namespaces", "bwrap", "process", "process-uid"])
@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_fails_and_harms_nothing(batches, mode, attack):
    if mode not in batches:
        batches[mode] = _batch(mode)
    batch = batches[mode]
    if "skip" in batch:
        pytest.skip(batch["skip"])
    why = batch["why"][attack.name]
    if why:
        pytest.skip(why)
    result = batch["results"][attack.name]
    assert result.status == attack.status, (result.reason, result.output[-1500:])
    if attack.reason:
        assert result.reason.startswith(attack.reason), (result.reason, result.output[-1500:])
    # the trainer (this process), the program beside it, files outside, the network, what it left running
    assert os.getppid() == batch["parent"]
    assert batch["sibling"].passed, batch["sibling"].reason
    assert batch["files"] == [] and batch["leftover"] == []
    if attack.name == "tcp_to_trainer":
        assert batch["received"] == []
    if attack.name == "fork_bomb":
        assert 0 < int(result.reason.split("forked")[1].split()[0]) < LIMITS.max_processes
