"""`mft pairs`: preference pairs from sampled answers and their sandbox verdicts (code_eval/pairs.py).

The pairing is checked on answers with known verdicts (hand-written records); the command end to end on the tiny
random model (its answers hold no code block, so every one fails: the references are chosen, checked in the
sandbox first) and, slow, on the real SmolLM2-135M-Instruct, whose sampled answers to an easy problem pass.
"""

from __future__ import annotations

import json

import pytest

from cli import main
from mft_components.code_eval import pairs as cp
from mft_components.code_eval.suites import Problem, read_eval_file
from tests.tiny_models import make_tiny_model_dir

ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
PROBLEMS = [
    # the reference passes: chosen when no sampled answer does
    {"task_id": "add", "prompt": "Write a Python function `add(a, b)` that returns the sum of a and b.",
     "test": ADD_TEST, "entry_point": "add", "solution": "def add(a, b):\n    return a + b"},
    # the reference fails its own test: no pair, counted
    {"task_id": "bad_reference", "prompt": "Write `add(a, b)`.", "test": ADD_TEST, "entry_point": "add",
     "solution": "def add(a, b):\n    return a - b"},
    # no reference: no pair, counted
    {"task_id": "no_reference", "prompt": "Write `add(a, b)`.", "test": ADD_TEST, "entry_point": "add"},
]


def _eval_file(path, records=PROBLEMS):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _answer(index, sample, status, text, finished=True, reason=None):
    return {"task": "t", "index": index, "sample": sample, "status": status, "completion": text,
            "finished": finished, "reason": reason or ("passed" if status == "passed" else f"{status}: why")}


def _problem(task_id, solution=None):
    return Problem(task_id=task_id, messages=[{"role": "system", "content": "S"}, {"role": "user", "content": task_id}],
                   test="pass", harness="script", solution=solution)


def test_pairs_from_known_verdicts():
    """Every distinct failing answer is rejected once against the distinct finished passing answers in turn; a
    truncated passing answer is never chosen; a problem none of whose answers passes takes its passing reference;
    all passing, and no passing answer and no (passing) reference, give no pair and are counted."""
    problems = [_problem("mixed"), _problem("reference", solution="x = 1"), _problem("all_pass"),
                _problem("failed_reference", solution="x = 2"), _problem("nothing")]
    records = [
        _answer(0, 0, "passed", "P0"), _answer(0, 1, "failed", "F1", reason="exit status 1: AssertionError"),
        _answer(0, 2, "passed", "P2"), _answer(0, 3, "timeout", "F3", reason="timed out after 2 s"),
        _answer(0, 4, "failed", "F1"), _answer(0, 5, "failed", "F5", finished=False),
        _answer(0, 6, "passed", "P6", finished=False),  # passed, but cut at max_new_tokens: never chosen
        _answer(1, 0, "failed", "G0"), _answer(1, 1, "passed", "G1", finished=False),
        _answer(2, 0, "passed", "A0"), _answer(2, 1, "passed", "A1"),
        _answer(3, 0, "failed", "H0"),
        _answer(4, 0, "failed", "N0"),
    ]
    result = cp.build_pairs({"t": problems}, records, {("t", 1): True, ("t", 3): False})["t"]
    got = [(p["task_id"], p["chosen"][-1]["content"], p["rejected"][-1]["content"], p["chosen_source"],
            p["rejected_status"], p["rejected_reason"]) for p in result.pairs]
    assert got == [
        ("mixed", "P0", "F1", "sample", "failed", "exit status 1: AssertionError"),
        ("mixed", "P2", "F3", "sample", "timeout", "timed out after 2 s"),
        ("mixed", "P0", "F5", "sample", "failed", "failed: why"),
        ("reference", "```python\nx = 1\n```", "G0", "reference", "failed", "failed: why"),
    ]
    first = result.pairs[0]
    assert first["chosen"][:-1] == first["rejected"][:-1] == [{"role": "system", "content": "S"},
                                                               {"role": "human", "content": "mixed"}]
    assert first["chosen"][-1]["role"] == "bot" and first["chosen_sample"] == 0 and first["rejected_sample"] == 1
    assert result.pairs[2]["rejected_finished"] is False
    assert result.counts() == {"problems": 5, "answers": 13, "passed": 6, "failed": 7, "from_samples": 1,
                               "from_reference": 1, "all_passed": 1, "skipped_no_passing": 2, "reference_failed": 1,
                               "pairs": 4}
    capped = cp.build_pairs({"t": problems}, records, {("t", 1): True}, max_pairs_per_problem=1)["t"]
    assert [p["rejected"][-1]["content"] for p in capped.pairs] == ["F1", "G0"]


def test_solution_field_round_trips_and_is_checked(tmp_path):
    problems = read_eval_file(_eval_file(tmp_path / "p.jsonl"))
    assert [p.solution for p in problems] == ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b",
                                              None]
    assert problems[0].to_record()["solution"] == PROBLEMS[0]["solution"]
    bad = _eval_file(tmp_path / "bad.jsonl", [{**PROBLEMS[0], "solution": " "}, {**PROBLEMS[0], "solution": 3}])
    with pytest.raises(ValueError) as e:
        read_eval_file(bad)
    assert f"{bad}:1: solution: is empty" in str(e.value) and f"{bad}:2: solution: expected a string" in str(e.value)


def test_mft_pairs_on_a_tiny_model(tmp_path, smollm2_dir, capsys):
    """Through the CLI: the tiny random model answers without a code block, so every answer fails with that reason;
    `add`'s reference passes the sandbox and is chosen, the failing reference and the missing one are counted."""
    model = make_tiny_model_dir(tmp_path / "model", tokenizer_dir=smollm2_dir)
    suite = _eval_file(tmp_path / "sums.jsonl")
    out = tmp_path / "pairs"
    argv = ["pairs", "--model", str(model), "--template", "mft", "--suite", str(suite), "--num-samples", "3",
            "--max-new-tokens", "6", "--timeout-s", "5", "--isolation", "process", "-o", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    pairs = [json.loads(line) for line in (out / "sums.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 9 and all(a["reason"] == "no code block in the answer" for a in answers)
    distinct = {a["completion"] for a in answers if a["task_id"] == "add"}
    assert len(pairs) == len(distinct) >= 1
    assert {p["rejected"][-1]["content"] for p in pairs} == distinct
    for p in pairs:
        assert p["task_id"] == "add" and p["chosen_source"] == "reference"
        assert p["chosen"][-1]["content"] == "```python\ndef add(a, b):\n    return a + b\n```"
        assert p["chosen"][0] == p["rejected"][0] == {"role": "human", "content": PROBLEMS[0]["prompt"]}
        assert p["rejected_reason"] == "no code block in the answer"
    summary = json.loads((out / "summary.json").read_text())["sums"]
    assert summary == {"problems": 3, "answers": 9, "passed": 0, "failed": 9, "from_samples": 0, "from_reference": 1,
                       "all_passed": 0, "skipped_no_passing": 2, "reference_failed": 1, "pairs": len(pairs),
                       "file": str(out / "sums.jsonl")}
    assert stdout.splitlines()[:2] == [
        "task  problems  passed  failed  from_samples  from_reference  all_passed  skipped_no_passing  pairs",
        f"sums         3       0       9             0               1           0                   2  {len(pairs):>5}"]
    # errors are messages, not tracebacks
    assert main(argv[:-1] + [str(suite)]) == 2
    assert f"--output {suite}: is a file" in capsys.readouterr().err
    assert main(argv + ["--num-samples", "0"]) == 2
    assert "--num-samples: 0; pairs need at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_mft_pairs_with_passing_answers(tmp_path, smollm2_dir):
    """SmolLM2-135M-Instruct (its own chat template) writes `add` in most samples: passing answers are chosen from
    its own samples; on `sub` (asked for add, tested for a - b) none passes and the reference is chosen."""
    sub = {"task_id": "sub", "prompt": PROBLEMS[0]["prompt"], "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == -1\n", "solution": "def add(a, b):\n    return a - b"}
    suite = _eval_file(tmp_path / "easy.jsonl", [PROBLEMS[0], sub])
    out = tmp_path / "pairs"
    assert main(["pairs", "--model", str(smollm2_dir), "--template", "hf", "--suite", str(suite), "--num-samples", "4",
                 "--temperature", "0.7", "--max-new-tokens", "120", "--timeout-s", "5", "--isolation", "process",
                 "-o", str(out)]) == 0
    answers = {(a["task_id"], a["sample"]): a for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines())}
    pairs = [json.loads(line) for line in (out / "easy.jsonl").read_text().splitlines()]
    assert any(a["status"] == "passed" for (t, _), a in answers.items() if t == "add")
    assert all(a["status"] != "passed" for (t, _), a in answers.items() if t == "sub")
    for p in pairs:
        rejected = answers[p["task_id"], p["rejected_sample"]]
        assert rejected["status"] != "passed" and p["rejected_reason"] == rejected["reason"]
        assert p["rejected"][-1]["content"] == rejected["completion"]
        if p["chosen_source"] == "sample":
            chosen = answers[p["task_id"], p["chosen_sample"]]
            assert chosen["status"] == "passed" and chosen["finished"]
            assert p["chosen"][-1]["content"] == chosen["completion"]
        else:
            assert p["task_id"] == "sub" and p["chosen"][-1]["content"] == cp.reference_answer(
                read_eval_file(suite)[1])
    assert any(p["task_id"] == "sub" for p in pairs)
