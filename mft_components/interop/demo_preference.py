"""``make demo-preference``: preference tuning after the SFT demo, on pairs built from execution results.

    python -m mft_components.interop.demo_preference pairs --model outputs/demo/exported -o outputs/demo_dpo/pairs
    mft run preference_finetune_distributed --config demo_dpo
    python -m mft_components.interop.demo_preference report outputs/demo_dpo/train

``pairs``: problems of dataframebench's ``val`` split (neither the SFT demo's ``train`` split nor the ``test`` split
code evaluation reads), for the tasks ``pandas_solution`` and ``polars_solution``, with their canonical solutions;
the SFT demo's model answers each ``--num-samples`` times in the training format and the answers run against the
problems' tests (``code_eval.pairs``, what ``mft pairs`` does). The 135M model solves none of them, so every pair
has the reference solution (checked in the sandbox first) as chosen and one of the model's failing answers, with the
reason it failed, as rejected. ``report``: per task, the held-out pairs' reward accuracy and margin and the model's
own preference (log-prob of chosen minus rejected) before the DPO stage and after it, from ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mft_components.assets.dataframebench import dataframebench_records
from mft_components.code_eval.evaluate import load_model, load_tasks, make_sandbox
from mft_components.code_eval.options import CodeEvalOptions
from mft_components.code_eval.pairs import make_pairs
from mft_components.code_eval.suites import dataframebench_problems, write_eval_file

__all__ = ["DEMO_PAIR_TASKS", "demo_pair_problems", "build_demo_pairs", "format_report", "main"]

DEMO_PAIR_TASKS = ("pandas_solution", "polars_solution")
DEMO_PAIR_SPLIT = "val"
DEMO_PAIR_PROBLEMS = 6


def demo_pair_problems(out_dir: str | Path, problems: int = DEMO_PAIR_PROBLEMS, split: str = DEMO_PAIR_SPLIT,
                       cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Eval files (with ``solution``) of the ``problems`` shortest-solution problems of ``split`` that need no
    library beyond pandas, polars, matplotlib, numpy and the standard library, one per task of ``DEMO_PAIR_TASKS``.

    Returns:
        task -> its eval file under ``out_dir``.
    """
    allowed = {"matplotlib", "numpy", *sys.stdlib_module_names}
    by_id = {p.task_id: p for p in dataframebench_problems(DEMO_PAIR_TASKS[0], split, cache_dir)}
    runnable = [r["task_id"] for r in dataframebench_records(split, cache_dir) if set(r.get("libs") or ()) <= allowed
                and r["task_id"] in by_id]
    per_task = {t: {p.task_id: p for p in dataframebench_problems(t, split, cache_dir)} for t in DEMO_PAIR_TASKS}
    with_solutions = [i for i in runnable if all(i in ps and ps[i].solution for ps in per_task.values())]
    chosen = sorted(with_solutions, key=lambda i: sum(len(ps[i].solution) for ps in per_task.values()))[:problems]
    return {t: write_eval_file([per_task[t][i] for i in sorted(chosen)], Path(out_dir) / f"{t}.jsonl")
            for t in DEMO_PAIR_TASKS}


def build_demo_pairs(model: str | Path, out_dir: str | Path, num_samples: int = 2, max_new_tokens: int = 128,
                     problems: int = DEMO_PAIR_PROBLEMS) -> dict:
    """The demo's pairs: eval files in ``out_dir/problems``, pairs in ``out_dir/TASK.jsonl`` (see module doc)."""
    out_dir = Path(out_dir)
    files = demo_pair_problems(out_dir / "problems", problems)
    options = CodeEvalOptions.from_config({"tasks": {t: str(f) for t, f in files.items()}, "num_samples": num_samples,
                                           "temperature": 1.0, "max_new_tokens": max_new_tokens, "batch_size": 8,
                                           "timeout_s": 30, "isolation": "auto"})
    tasks = load_tasks(options)
    sandbox = make_sandbox(options)
    try:
        gm = load_model(str(model), None, "fp32", "cpu")
        return make_pairs(gm, tasks, options, sandbox, out_dir)
    finally:
        sandbox.close()


def _eval_rows(train_dir: Path) -> list[dict]:
    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; run the DPO stage first (mft run preference_finetune_distributed "
                                "--config demo_dpo)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "eval"]


def format_report(rows: list[dict]) -> str:
    """Per task, held-out reward accuracy, reward margin and log p(chosen) - log p(rejected), first and last
    evaluation. Before training the policy is the reference, so every reward is 0 (accuracy 0, margin 0); the
    log-prob gap says which answer the SFT model itself preferred."""
    first, last = rows[0], rows[-1]
    tasks = sorted({k.split("/", 1)[1] for k in last if k.startswith("accuracy/")})
    width = max(len("overall"), *map(len, tasks))
    columns = (("reward accuracy", "accuracy", ".3f"), ("reward margin", "margin", ".3f"),
               ("logp(chosen) - logp(rejected)", None, ".2f"))

    def value(row: dict, name: str | None, task: str | None) -> float:
        if name is None:
            return value(row, "chosen_logp", task) - value(row, "rejected_logp", task)
        return row.get(f"{name}/{task}" if task else name, math.nan)

    lines = [f"held-out pairs, step {first['step']} -> step {last['step']}:",
             f"{'task':<{width}}" + "".join(f"  {title:>29}" for title, _, _ in columns)]
    for task in [*tasks, None]:
        cells = [f"{value(first, name, task):{fmt}} -> {value(last, name, task):{fmt}}" for _, name, fmt in columns]
        lines.append(f"{task or 'overall':<{width}}" + "".join(f"  {c:>29}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mft_components.interop.demo_preference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pairs", help="pairs for two dataframebench tasks from the SFT demo's answers")
    p.add_argument("--model", required=True, help="the SFT demo's exported model (outputs/demo/exported)")
    p.add_argument("-o", "--output", required=True, help="directory for the pairs")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--problems", type=int, default=DEMO_PAIR_PROBLEMS, help="problems per task")
    r = sub.add_parser("report", help="per-task reward accuracy before and after the DPO stage")
    r.add_argument("train_dir", help="the DPO stage's output_dir")
    args = parser.parse_args(argv)
    if args.command == "pairs":
        if not Path(args.model).is_dir():
            print(f"demo-preference: {args.model}: no such directory; run `make demo` first (the DPO stage starts "
                  "from its exported model)", file=sys.stderr)
            return 2
        result = build_demo_pairs(args.model, args.output, args.num_samples, args.max_new_tokens, args.problems)
        if not all(tp.pairs for tp in result.values()):
            print("demo-preference: a task has no pair (see summary.json)", file=sys.stderr)
            return 1
        return 0
    try:
        rows = _eval_rows(Path(args.train_dir))
    except FileNotFoundError as e:
        print(f"demo-preference: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"demo-preference: {args.train_dir}/metrics.jsonl holds no evaluation", file=sys.stderr)
        return 1
    print(format_report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
