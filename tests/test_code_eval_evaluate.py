"""Code evaluation in the recipe and `mft eval`: schedule, metrics, checkpoints, select_by, config validation.

The recipe runs use the tiny random model (its answers hold no code: every verdict is "no code block", pass@1 0),
so what is checked is the wiring; real verdicts come from the real SmolLM2-135M-Instruct in `mft eval` (a base
model with its own chat template on easy problems) and from the agreement tests in test_code_eval_suites.py.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from mft_components.training import checkpoint as ck
from mft_components.code_eval import evaluate as ce
from mft_components.code_eval.options import CodeEvalError, CodeEvalOptions
from mft_components.training.guards import EarlyStopping
from tests.test_recipes import LORA_RECIPE, _config, _records, _run, assets  # noqa: F401  (fixture)

EASY = [
    {"task_id": "add", "prompt": "Write a Python function `add(a, b)` that returns the sum of a and b.",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
    {"task_id": "hang", "prompt": "Write a Python function `add(a, b)` that returns the sum of a and b.",
     "test": "def check(candidate):\n    while True:\n        pass\n", "entry_point": "add"},
]


def _eval_file(path, records=EASY):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_early_stopping_on_a_pass_rate():
    es = EarlyStopping(patience=2, metric="pass@1", higher_is_better=True)
    assert [es.update(s, v) for s, v in [(1, 0.0), (2, 0.25), (3, 0.25), (4, 0.5), (5, 0.1), (6, 0.5)]] == [
        True, True, False, True, False, False]
    assert es.best_step == 4 and es.best_loss == 0.5 and es.should_stop
    restored = EarlyStopping(metric="pass@1", higher_is_better=True)
    restored.load_state_dict(es.state_dict())
    assert restored.best_step == 4 and not restored.update(7, 0.5)


def test_recipe_evaluates_code_and_selects_by_pass_at_1(assets, tmp_path, capsys):  # noqa: F811
    """Before training, every 2 steps; pass@1 drives early stopping (patience 1) while the loss still falls."""
    code = {"tasks": {"sums": _eval_file(tmp_path / "sums.jsonl")}, "every_n_steps": 2, "max_new_tokens": 8,
            "num_samples": 2, "select_by": "pass@1", "timeout_s": 5, "isolation": "process"}
    cfg = _config(assets, tmp_path, max_steps=8, eval_every_n_steps=1, early_stopping_patience=1, eval={"code": code})
    _run(LORA_RECIPE, cfg)
    out = tmp_path / "out"
    evals = _records(out, "code_eval")
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert evals[-1]["task_pass@1"] == {"sums": 0.0} and evals[-1]["pass@2"] == 0.0
    assert evals[-1]["generate_s"] > 0 and evals[-1]["seconds"] >= evals[-1]["generate_s"]
    losses = [r["loss"] for r in _records(out, "eval")]
    assert losses[4] < losses[2]  # the loss improved, yet pass@1 did not: pass@1 decides
    stdout = capsys.readouterr().out
    assert "early stopping: 1 evaluations without a better pass@1 than step 2's" in stdout
    # the per-task values under the best step are its pass@1, not the losses of another step's evaluation
    assert "best step: 2 (pass@1 0.0000)\n  sums  pass@1 0.0000\ncheckpoints:" in stdout
    assert "code eval pass@1 0.000" in stdout and "isolation: separate process" in stdout
    answers = [json.loads(line) for line in (out / "code_eval" / "step_4.jsonl").read_text().splitlines()]
    assert [(a["task_id"], a["sample"]) for a in answers] == [
        ("add", "greedy"), ("add", 0), ("add", 1), ("hang", "greedy"), ("hang", 0), ("hang", 1)]
    assert all(a["status"] == "failed" and a["reason"] == "no code block in the answer" for a in answers)
    meta = ck.read_checkpoint_meta(out / "step_4")
    assert meta["code_eval"]["step"] == 4 and meta["code_eval"]["task_pass@1"] == {"sums": 0.0}
    assert meta["code_eval"]["isolation"].startswith("separate process")
    assert ck.load_recipe_state(out / "step_4")["code_evaluator"]["best"][0] == 2
    # `mft eval` on the saved checkpoint (base + adapter, merged) answers what the in-training model answered.
    args = _parse(["--model", str(out / "step_4"), "--suite", code["tasks"]["sums"], "--max-new-tokens", "8",
                   "--output", str(tmp_path / "again.jsonl"), "--isolation", "process"])
    assert ce.run(args) == 0
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [a["completion"] for a in again] == [a["completion"] for a in answers if a["sample"] == "greedy"]


def test_select_by_pass_at_1_resumes_exactly(assets, tmp_path):  # noqa: F811
    """resume: auto with select_by pass@1 continues as the run that never stopped: same evaluations, the same best
    step in every record (the validation loss's own tracker included, which select_by keeps apart from early
    stopping), the same checkpoints. lr 0: the loss never improves after step 1, so a tracker that restarted would
    call step 3 the best."""
    code = {"tasks": {"sums": _eval_file(tmp_path / "sums.jsonl")}, "every_n_steps": 2, "max_new_tokens": 2,
            "select_by": "pass@1", "isolation": "process"}
    cfg = _config(assets, tmp_path, max_steps=4, eval_every_n_steps=1, save_every_n_steps=2, eval={"code": code},
                  **{"optimizer.lr": 0.0, "lr_scheduler.min_lr": 0.0})
    _run(LORA_RECIPE, cfg)
    straight, resumed = tmp_path / "out", tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "step_2", resumed / "step_2")
    _run(LORA_RECIPE, cfg, f"output_dir={resumed}", "resume=auto")

    timing = {"seconds", "generate_s", "execute_s", "tokens_per_s", "peak_memory_gb"}
    for kind in ("train", "eval", "code_eval"):
        after = [{k: v for k, v in r.items() if k not in timing} for r in _records(straight, kind) if r["step"] > 2]
        assert [{k: v for k, v in r.items() if k not in timing} for r in _records(resumed, kind)] == after, kind
    assert [r["best_step"] for r in _records(resumed, "eval")] == [1, 1]
    a, b = ck.load_recipe_state(straight / "step_4"), ck.load_recipe_state(resumed / "step_4")
    assert b["evaluator"] == a["evaluator"] and b["early_stopping"] == a["early_stopping"]
    assert [(step, metrics["pass@1"]) for step, metrics in b["code_evaluator"].values()] == [
        (step, metrics["pass@1"]) for step, metrics in a["code_evaluator"].values()] == [(4, 0.0), (2, 0.0)]


def _strongest_isolation() -> str:
    """auto where bubblewrap or namespaces start (bubblewrap here and in CI), else process."""
    from mft_components.code_eval.sandbox import Sandbox, SandboxError

    try:
        Sandbox(workers=1, isolation="auto").close()
        return "auto"
    except SandboxError:
        return "process"


def test_code_evaluation_leaves_training_unchanged(assets, tmp_path):  # noqa: F811
    """Sampled answers use their own RNG stream and the model goes back to train mode with its own attention:
    a run with code evaluations trains exactly as one without (dropout on, so the RNG would show); under the
    strongest isolation here, which the trainer starts with output_dir hidden."""
    isolation = _strongest_isolation()
    code = {"tasks": {"sums": _eval_file(tmp_path / "sums.jsonl")}, "every_n_steps": 1, "max_new_tokens": 4,
            "num_samples": 2, "isolation": isolation}
    plain = _config(assets, tmp_path, name="plain", **{"model.lora.dropout": 0.2})
    with_code = _config(assets, tmp_path, name="code", eval={"code": code}, **{"model.lora.dropout": 0.2})
    _run(LORA_RECIPE, plain, f"output_dir={tmp_path / 'a'}")
    _run(LORA_RECIPE, with_code, f"output_dir={tmp_path / 'b'}")
    assert [r["step"] for r in _records(tmp_path / "b", "code_eval")] == [0, 1, 2, 3, 4]
    if isolation == "auto" and shutil.which("bwrap"):
        reported = ck.read_checkpoint_meta(tmp_path / "b" / "step_4")["code_eval"]["isolation"]
        assert reported.startswith("bubblewrap") and "instead of" not in reported, reported
    assert [r["loss"] for r in _records(tmp_path / "a", "train")] == [r["loss"] for r in _records(tmp_path / "b", "train")]
    a, b = ck.load_checkpoint_weights(tmp_path / "a" / "step_4"), ck.load_checkpoint_weights(tmp_path / "b" / "step_4")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_validate_names_every_bad_key(assets, tmp_path, capsys):  # noqa: F811
    from cli import main

    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text(json.dumps({"prompt": "p"}) + "\n")
    code = {"tasks": {"a": str(tmp_path / "missing.jsonl"), "b": "dataframebench:unit_tests", "c": str(bad_file),
                      "d": "humaneval"},
            "num_samples": 4, "k": [1, 9], "top_p": 2, "select_by": "pass@3", "every_n_steps": 0, "timeout_s": "x",
            "python": "/nonexistent/python", "bogus": 1}
    cfg = _config(assets, tmp_path, eval={"code": code})
    problems = CodeEvalOptions.value_problems(code)
    keys = [k for k, _ in problems]
    assert keys == ["tasks.a", "tasks.b", "tasks.c", "every_n_steps", "top_p", "k", "k", "select_by", "python"]
    assert f"{bad_file}:1: test: missing or empty" in dict(problems)["tasks.c"]
    with pytest.raises(CodeEvalError, match=r"eval.code.bogus: unknown key"):
        CodeEvalOptions.from_config(code)
    assert main(["validate", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    for expected in ("unknown key 'eval.code.bogus'", "'eval.code.timeout_s' is 'x': expected a number",
                     "'eval.code.tasks.b': dataframebench task 'unit_tests' unknown",
                     "'eval.code.k': 9: pass@9 needs num_samples >= 9 sampled answers per problem (it is 4)",
                     "'eval.code.select_by' is 'pass@3': expected one of loss, pass@1, pass@9",
                     f"{bad_file}:1: test: missing or empty"):
        assert expected in err, (expected, err)
    good = _config(assets, tmp_path, name="good", eval={"code": {"tasks": {"d": "humaneval"}, "num_samples": 5,
                                                                 "k": [2, 5], "select_by": "pass@5"}})
    assert main(["validate", "--config", str(good)]) == 0
    # The recipe refuses the same before anything runs.
    with pytest.raises(SystemExit, match=r"config errors:(.|\n)*'eval.code.tasks.a': path does not exist"):
        _run(LORA_RECIPE, cfg)


def test_mft_eval_on_a_base_model(smollm2_dir, tmp_path, capsys):
    """SmolLM2-135M-Instruct with its own chat template writes `add`: the verdict passes; a test that hangs times
    out; the table and the JSONL say so."""
    out = tmp_path / "answers.jsonl"
    args = _parse(["--model", str(smollm2_dir), "--template", "hf", "--suite", _eval_file(tmp_path / "easy.jsonl"),
                   "--max-new-tokens", "40", "--timeout-s", "2", "--output", str(out), "--isolation", "process"])
    assert ce.run(args) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(a["task_id"], a["status"]) for a in answers] == [("add", "passed"), ("hang", "timeout")]
    assert "def add(a, b)" in answers[0]["code"] and answers[1]["reason"] == "timed out after 2 s"
    table = capsys.readouterr().out.splitlines()
    assert table[:3] == ["task     problems    pass@1", "easy            2     0.500", "overall         2     0.500"]


def test_mft_eval_errors(tmp_path, capsys, smollm2_dir):
    assert ce.run(_parse(["--model", str(tmp_path), "--suite", "mbpp"])) == 2
    assert "eval.code.tasks.mbpp: path does not exist: mbpp (an eval set is a .jsonl file, or a suite: humaneval" \
        in capsys.readouterr().err
    assert ce.run(_parse(["--model", str(tmp_path), "--suite", "dataframebench", "--task", "unit_tests"])) == 2
    assert "eval.code.tasks.unit_tests: dataframebench task 'unit_tests' unknown" in capsys.readouterr().err
    assert ce.run(_parse(["--model", str(tmp_path), "--suite", "humaneval"])) == 2  # no model there
    assert "no training chat format" in capsys.readouterr().err
    assert ce.run(_parse(["--model", str(smollm2_dir), "--suite", "humaneval"])) == 2  # a base model: how to prompt it
    assert "pass --template hf (its tokenizer's chat_template) or --template mft" in capsys.readouterr().err
    # humaneval is one task: a second --task was silently dropped
    assert ce.run(_parse(["--model", str(smollm2_dir), "--suite", "humaneval", "--task", "a", "--task", "b"])) == 2
    assert "--task: one name for humaneval (it names the task in the results), got ['a', 'b']" in \
        capsys.readouterr().err


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    ce.add_arguments(parser)
    return parser.parse_args(argv)


def test_table_format():
    metrics = {"task_problems": {"pandas_solution": 4, "polars": 2}, "pass@1": 0.375, "pass@5": 0.5,
               "task_pass@1": {"pandas_solution": 0.25, "polars": 0.5}, "task_pass@5": {"pandas_solution": 0.5,
                                                                                        "polars": 0.5}}
    assert ce.format_table(metrics, [5]).splitlines() == [
        "task             problems    pass@1    pass@5",
        "pandas_solution         4     0.250     0.500",
        "polars                  2     0.500     0.500",
        "overall                 6     0.375     0.500",
    ]
    assert math.isnan(ce._score([], {}, [])["pass@1"])


def test_sandbox_errors_are_left_out_of_pass_at_k():
    """An answer the sandbox could not run (status error) is no verdict: pass@k is over the others, per task."""
    rec = lambda i, s, status: {"task": "t", "index": i, "sample": s, "status": status}  # noqa: E731
    records = [rec(0, "greedy", "passed"), rec(1, "greedy", "error"), rec(2, "greedy", "failed"),
               rec(0, 0, "passed"), rec(0, 1, "error"), rec(1, 0, "failed"), rec(1, 1, "passed"),
               rec(2, 0, "failed"), rec(2, 1, "failed")]
    metrics = ce._score(records, {"t": [None] * 3}, [2])
    assert metrics["task_errors"] == {"t": 2}
    assert metrics["pass@1"] == 0.5  # problems 0 and 2; problem 1's only greedy answer was not run
    assert metrics["pass@2"] == 0.5  # problems 1 and 2; problem 0 has one sampled verdict left, fewer than k
