"""Preference pairs from execution results: ``mft pairs --model M --suite S --num-samples N -o DIR``.

    eval sets (suites.py) --evaluate.generate_answers (N sampled answers per problem, the training chat format)-->
      answers --evaluate.execute_answers (the sandbox of code evaluation)--> verdicts
      --build_pairs--> per task: (passing answer, failing answer) pairs, the failure's status and reason kept
      --> DIR/TASK.jsonl (MFTCoder's xxpo shape), DIR/answers.jsonl, DIR/summary.json

A pair's ``chosen`` is a passing answer that ended with the EOS (a truncated one would teach the model to stop
mid-answer once the recipe appends the EOS) and its ``rejected`` a failing answer, both to the same prompt::

    {"chosen":   [{"role": "human", "content": PROMPT}, {"role": "bot", "content": PASSING}],
     "rejected": [{"role": "human", "content": PROMPT}, {"role": "bot", "content": FAILING}],
     "task_id": "...", "chosen_source": "sample" | "reference", "chosen_sample": 3,
     "rejected_sample": 1, "rejected_status": "failed" | "timeout" | ..., "rejected_reason": "...",
     "rejected_finished": true}

Each distinct failing answer of a problem is rejected once (up to ``--max-pairs-per-problem``), against the
distinct passing answers in turn. A problem none of whose answers passes takes its eval record's ``solution`` (the
reference, written as a ```python block as the training answers are) as the chosen answer, once the sandbox has
passed it too; without one (or when it fails) the problem is counted and skipped. A problem whose answers all pass
gives no pair. The per-task counts are printed and written to ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mft_components.code_eval.evaluate import (
    add_model_arguments,
    add_option_arguments,
    execute_answers,
    generate_answers,
    load_model,
    load_tasks,
    make_sandbox,
    options_from_arguments,
    suite_tasks,
    with_training_eos,
    write_records,
)
from mft_components.code_eval.sandbox import Sandbox, SandboxError
from mft_components.code_eval.suites import Problem
from mft_components.inference.generate import GenerateError

__all__ = ["TaskPairs", "reference_answer", "build_pairs", "check_references", "write_pairs", "format_summary",
           "make_pairs", "add_arguments", "run"]

# What `mft pairs` decodes with unless told: sampling (pairs need both verdicts on one prompt).
PAIRS_DEFAULTS = {"num_samples": 8, "temperature": 1.0}
_ROLES = {"user": "human", "assistant": "bot"}  # MFTCoder's chat_rounds roles, as the eval records write them


@dataclass
class TaskPairs:
    """One task's pairs and the counts ``summary.json`` holds.

    Attributes:
        problems: problems asked.
        answers, passed, failed: sampled answers and their verdicts.
        from_samples: problems paired with one of their own passing answers as chosen.
        from_reference: problems none of whose answers passed, paired with their reference solution.
        all_passed: problems with no failing answer (no pair).
        skipped_no_passing: problems with neither a passing answer nor a passing reference (no pair).
        reference_failed: references the sandbox failed (those problems are in ``skipped_no_passing``).
        pairs: the pair records (``len(pairs)`` is the task's count).
    """

    problems: int = 0
    answers: int = 0
    passed: int = 0
    failed: int = 0
    from_samples: int = 0
    from_reference: int = 0
    all_passed: int = 0
    skipped_no_passing: int = 0
    reference_failed: int = 0
    pairs: list | None = None

    def counts(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "pairs"}
        out["pairs"] = len(self.pairs or [])
        return out


def reference_answer(problem: Problem) -> str:
    """The answer a reference solution stands for: its code in a ```python block, as the training answers are."""
    return f"```python\n{problem.solution.strip()}\n```"


def _rounds(messages: list[dict], answer: str) -> list[dict]:
    return [{"role": _ROLES.get(m["role"], m["role"]), "content": m["content"]} for m in messages] + [
        {"role": "bot", "content": answer}]


def _distinct(records: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in records:
        if r["completion"] not in seen:
            seen.add(r["completion"])
            out.append(r)
    return out


def build_pairs(tasks: dict[str, list[Problem]], records: list[dict], reference_passed: dict[tuple[str, int], bool],
                max_pairs_per_problem: int | None = None) -> dict[str, TaskPairs]:
    """Pair each problem's passing and failing answers.

    Args:
        tasks: task -> problems, as generated.
        records: one per answer with its verdict (``execute_answers``).
        reference_passed: ``(task, index)`` -> the sandbox's verdict on the reference solution, for the problems
            with no passing answer and a ``solution``.
        max_pairs_per_problem: at most this many pairs per problem (None: one per distinct failing answer).

    Returns:
        task -> its pairs and counts.
    """
    by_problem: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        by_problem.setdefault((r["task"], r["index"]), []).append(r)
    out = {}
    for task, problems in tasks.items():
        tp = TaskPairs(problems=len(problems), pairs=[])
        for index, problem in enumerate(problems):
            answers = sorted(by_problem.get((task, index), []), key=lambda r: r["sample"])
            passing = [r for r in answers if r["status"] == "passed"]
            tp.answers += len(answers)
            tp.passed += len(passing)
            tp.failed += len(answers) - len(passing)
            chosen = [(r["completion"], "sample", r["sample"]) for r in _distinct([r for r in passing if r["finished"]])]
            rejected = _distinct([r for r in answers if r["status"] != "passed"])
            if not rejected:
                tp.all_passed += 1
                continue
            if chosen:
                tp.from_samples += 1
            elif reference_passed.get((task, index)):
                chosen = [(reference_answer(problem), "reference", None)]
                tp.from_reference += 1
            else:
                tp.reference_failed += (task, index) in reference_passed
                tp.skipped_no_passing += 1
                continue
            for n, r in enumerate(rejected[:max_pairs_per_problem]):
                text, source, sample = chosen[n % len(chosen)]
                if text == r["completion"]:  # the same text passed once and failed once: a flaky test, no signal
                    continue
                tp.pairs.append({"chosen": _rounds(problem.messages, text),
                                 "rejected": _rounds(problem.messages, r["completion"]),
                                 "task_id": problem.task_id, "chosen_source": source, "chosen_sample": sample,
                                 "rejected_sample": r["sample"], "rejected_status": r["status"],
                                 "rejected_reason": r["reason"], "rejected_finished": r["finished"]})
        out[task] = tp
    return out


def check_references(tasks: dict[str, list[Problem]], records: list[dict], sandbox: Sandbox) -> dict:
    """Run the reference solution of every problem that has one, a failing answer and no (finished) passing answer:
    the problems :func:`build_pairs` would pair with it. Returns ``(task, index)`` -> passed."""
    solved = {(r["task"], r["index"]) for r in records if r["status"] == "passed" and r["finished"]}
    failing = {(r["task"], r["index"]) for r in records if r["status"] != "passed"}
    todo = [(t, i, p) for t, ps in tasks.items() for i, p in enumerate(ps)
            if p.solution and (t, i) in failing and (t, i) not in solved]
    results = sandbox.run_many([p.program(p.solution) for _, _, p in todo])
    return {(t, i): result.status == "passed" for (t, i, _), result in zip(todo, results)}


def write_pairs(result: dict[str, TaskPairs], out_dir: str | Path) -> dict[str, Path]:
    """``DIR/TASK.jsonl`` per task (a task of ``data.data_paths`` each) and ``DIR/summary.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {task: write_records(tp.pairs, out_dir / f"{task}.jsonl") for task, tp in result.items()}
    summary = {task: {**tp.counts(), "file": str(paths[task])} for task, tp in result.items()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return paths


def format_summary(result: dict[str, TaskPairs]) -> str:
    """Per task: problems, answers passed / failed, where the chosen answers came from, skipped problems, pairs."""
    columns = ("problems", "passed", "failed", "from_samples", "from_reference", "all_passed", "skipped_no_passing",
               "pairs")
    width = max(len("task"), *map(len, result))
    lines = [f"{'task':<{width}}  " + "  ".join(columns)]
    for task, tp in result.items():
        counts = tp.counts()
        lines.append(f"{task:<{width}}  " + "  ".join(f"{counts[c]:>{len(c)}}" for c in columns))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- CLI

_OPTIONS = ("num_samples", "temperature", "top_p", "max_new_tokens", "batch_size", "cpu_threads", "max_problems",
            "timeout_s", "memory_mb", "max_processes", "workers", "python", "isolation", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mft pairs``."""
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True,
                        help="directory for TASK.jsonl (the pairs), answers.jsonl (every answer with its verdict) and "
                             "summary.json")
    parser.add_argument("--max-pairs-per-problem", type=int, default=None,
                        help="at most this many pairs per problem (default: one per distinct failing answer)")
    add_option_arguments(parser, _OPTIONS, **PAIRS_DEFAULTS)


def run(args: argparse.Namespace) -> int:
    """``mft pairs``: sample, execute, pair; the per-task summary on stdout; errors: status 2 with a message."""
    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples: {args.num_samples}; pairs need at least 1 sampled answer per problem")
        if args.max_pairs_per_problem is not None and args.max_pairs_per_problem < 1:
            raise ValueError(f"--max-pairs-per-problem: {args.max_pairs_per_problem}; expected 1 or more")
        out_dir = Path(args.output)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--output {out_dir}: is a file; expected a directory (it is created if missing)")
        options = options_from_arguments(args, suite_tasks(args.suite, args.task), _OPTIONS)
        tasks = load_tasks(options)
        sandbox = make_sandbox(options)
        gm = load_model(args.model, args.template, args.dtype, args.device, args.trust_remote_code)
    except (ValueError, SandboxError, GenerateError) as e:  # CodeEvalError, EvalSetError are ValueErrors
        print(f"mft pairs: error: {e}", file=sys.stderr)
        return 2
    print(f"isolation: {sandbox.isolation}", file=sys.stderr)
    try:
        make_pairs(gm, tasks, options, sandbox, out_dir, args.max_pairs_per_problem)
    finally:
        sandbox.close()
    return 0


def make_pairs(gm, tasks: dict[str, list[Problem]], options, sandbox: Sandbox, out_dir: str | Path,
               max_pairs_per_problem: int | None = None) -> dict[str, TaskPairs]:
    """Sample, execute, pair and write (``mft pairs`` after its checks); prints the per-task summary.

    Args:
        gm: a ``GenerationModel`` (``evaluate.load_model``).
        tasks: task -> problems.
        options: ``CodeEvalOptions`` (``num_samples`` answers per problem, sampling and sandbox settings).
        sandbox: where the answers and the references run.
        out_dir: where ``TASK.jsonl``, ``answers.jsonl`` and ``summary.json`` go.
    """
    out_dir = Path(out_dir)
    start = time.perf_counter()
    tokenizer = with_training_eos(gm.tokenizer, gm.eos_token_id)
    items, answers = generate_answers(gm.model, tokenizer, gm.chat_format, tasks, options, greedy=False)
    generate_s = time.perf_counter() - start
    records, execute_s = execute_answers(items, answers, tokenizer, sandbox)
    reference_passed = check_references(tasks, records, sandbox)
    result = build_pairs(tasks, records, reference_passed, max_pairs_per_problem)
    write_pairs(result, out_dir)
    write_records(records, out_dir / "answers.jsonl")
    print(format_summary(result))
    print(f"{len(records)} answers in {time.perf_counter() - start:.1f}s (generation {generate_s:.1f}s, execution "
          f"{execute_s:.1f}s); pairs: {out_dir}/TASK.jsonl, answers and verdicts: {out_dir}/answers.jsonl, "
          f"counts: {out_dir}/summary.json")
    return result
