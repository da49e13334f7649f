"""``mft runs compare A B``: two runs side by side, per task, at each run's best checkpoint.

A run's best step is the one its early stopping chose: the validation loss, or ``eval.code.select_by`` (pass@k,
higher is better) when the run's config set it. It is read from the run's metrics.jsonl among the steps that still
have a checkpoint (all evaluated steps when none is left). The table holds, per task, the validation loss and the
code evaluation's pass@k at that step, for both runs, and B - A.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mft_components.training.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint_meta
from mft_components.training.plots import read_metrics

__all__ = ["RunBest", "add_arguments", "best_of_run", "compare_table", "run"]


@dataclass
class RunBest:
    """A run's best step and its per-task values there."""

    run_dir: Path
    step: int | None
    select_by: str
    selected_value: float | None
    checkpoint: Path | None
    task_values: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> task -> value


def _select_by(run_dir: Path) -> str:
    """What chose the run's best checkpoint, from its newest checkpoint's config (default: the loss)."""
    ckpt = latest_checkpoint(run_dir)
    try:
        config = read_checkpoint_meta(ckpt).get("config") or {} if ckpt is not None else {}
    except (OSError, ValueError):
        config = {}
    code = (config.get("eval") or {}).get("code") or {}
    return code.get("select_by") or "loss"


def best_of_run(run_dir: str | Path) -> RunBest:
    """The best step of a run and its per-task validation losses and pass@k.

    Raises:
        FileNotFoundError: no metrics.jsonl in ``run_dir``.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    select_by = _select_by(run_dir)
    kind, key, better = ("eval", "loss", min) if select_by == "loss" else ("code_eval", select_by, max)
    scores = {r["step"]: r[key] for r in records
              if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}
    checkpoints = dict(list_checkpoints(run_dir))
    candidates = {s: v for s, v in scores.items() if s in checkpoints} or scores
    step = None
    if candidates:
        best_value = better(candidates.values())
        step = min(s for s, v in candidates.items() if v == best_value)  # the first to reach it, as early stopping
    result = RunBest(run_dir, step, select_by, candidates.get(step), checkpoints.get(step))
    for r in records:
        if r.get("step") != step:
            continue
        if r.get("kind") == "eval":
            result.task_values["val loss"] = dict(r.get("task_loss") or {})
        elif r.get("kind") == "code_eval":
            for metric, per_task in r.items():
                if metric.startswith("task_pass@") and isinstance(per_task, dict):
                    result.task_values[metric[len("task_"):]] = dict(per_task)
    return result


def compare_table(a: RunBest, b: RunBest) -> str:
    """The printed comparison: a header line per run, then one row per task and metric column group."""
    lines = []
    for name, r in (("A", a), ("B", b)):
        where = f"step {r.step}" if r.step is not None else "no evaluated step"
        chosen = f" ({r.select_by} {r.selected_value:.4f})" if r.selected_value is not None else ""
        ckpt = f", checkpoint {r.checkpoint.name}" if r.checkpoint is not None else ", no checkpoint left"
        lines.append(f"{name}: {r.run_dir}  best {where}{chosen}{ckpt}")
    metrics = list(dict.fromkeys([*a.task_values, *b.task_values]))
    tasks = list(dict.fromkeys(t for r in (a, b) for m in metrics for t in r.task_values.get(m, {})))
    if not tasks:
        lines.append("no per-task values at the best steps (did the runs evaluate?)")
        return "\n".join(lines)
    width = max(4, *map(len, tasks))
    header, rule = f"{'task':<{width}}", "-" * width
    for m in metrics:
        for col in (f"{m} A", f"{m} B", "B-A"):
            header += f"  {col:>{max(10, len(col))}}"
            rule += "  " + "-" * max(10, len(col))
    lines += ["", header, rule]
    for task in tasks:
        row = f"{task:<{width}}"
        for m in metrics:
            va, vb = a.task_values.get(m, {}).get(task), b.task_values.get(m, {}).get(task)
            diff = vb - va if va is not None and vb is not None else None
            for col, v in ((f"{m} A", va), (f"{m} B", vb), ("B-A", diff)):
                text = "-" if v is None else (f"{v:+.4f}" if col == "B-A" else f"{v:.4f}")
                row += f"  {text:>{max(10, len(col))}}"
        lines.append(row)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mft runs`` command line."""
    sub = parser.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("compare", help="per-task table of two runs' best checkpoints")
    p.add_argument("run_a", metavar="A", help="a run's output_dir")
    p.add_argument("run_b", metavar="B", help="another run's output_dir")
    p.add_argument("--json", action="store_true", help="print the two runs' best steps and values as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        a, b = best_of_run(args.run_a), best_of_run(args.run_b)
    except FileNotFoundError as e:
        print(f"mft runs compare: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({name: {"run_dir": str(r.run_dir), "step": r.step, "select_by": r.select_by,
                                 "value": r.selected_value, "checkpoint": str(r.checkpoint) if r.checkpoint else None,
                                 "tasks": r.task_values} for name, r in (("A", a), ("B", b))}, indent=1))
    else:
        print(compare_table(a, b))
    return 0
