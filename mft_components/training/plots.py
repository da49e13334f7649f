"""``mft plot RUN_DIR``: a run's curves from its metrics.jsonl, one PNG per quantity, tasks as labelled lines.

    train_loss.png     training loss, overall and per task (``loss/TASK``), over steps
    val_loss.png       validation loss, overall and per task
    pass_at_K.png      pass@K of the code evaluation, overall and per task (one figure per K)
    lr.png             learning rate
    tokens_per_s.png   training throughput (real tokens per second, all ranks)

Each PNG has a JSON sidecar (``NAME.json``: title, axis labels, and every line's label, steps and values) that
says exactly what was drawn, for a script or a test. A run writes the same files to ``output_dir/plots`` at its
end (when matplotlib is installed: the ``plot`` extra).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["add_arguments", "plot_series", "read_metrics", "run", "write_plots_at_end", "write_run_plots"]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` (a line cut short by a kill is skipped).

    Raises:
        FileNotFoundError: there is none, naming the path.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} the output_dir of a run?)")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _line(records: list[dict], kind: str, key: str, task: str | None = None) -> dict[int, float]:
    """step -> value of one series (the last record of a step wins)."""
    points = {}
    for r in records:
        if r.get("kind") != kind:
            continue
        value = r.get(key) if task is None else (r.get(key) or {}).get(task)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            points[r["step"]] = float(value)
    return dict(sorted(points.items()))


def _tasks(records: list[dict], kind: str, key: str) -> list[str]:
    """Task names of a per-task series: the keys of ``key`` dicts, or the suffixes of ``key/TASK`` keys."""
    tasks: dict[str, None] = {}
    for r in records:
        if r.get("kind") != kind:
            continue
        if isinstance(r.get(key), dict):
            tasks.update(dict.fromkeys(r[key]))
        tasks.update(dict.fromkeys(k[len(key) + 1:] for k in r if k.startswith(key + "/")))
    return list(tasks)


def plot_series(records: list[dict]) -> dict[str, dict]:
    """Figure name -> {title, xlabel, ylabel, lines: [{label, steps, values}]} for every quantity the run logged."""
    figures: dict[str, dict] = {}

    def figure(name: str, title: str, ylabel: str, lines: list[tuple[str, dict[int, float]]]) -> None:
        lines = [(label, pts) for label, pts in lines if pts]
        if lines:
            figures[name] = {"title": title, "xlabel": "step", "ylabel": ylabel, "lines": [
                {"label": label, "steps": list(pts), "values": list(pts.values())} for label, pts in lines]}

    figure("train_loss", "training loss per task", "loss (nats/token)",
           [("all tasks", _line(records, "train", "loss"))]
           + [(t, _line(records, "train", f"loss/{t}")) for t in _tasks(records, "train", "loss")])
    figure("val_loss", "validation loss per task", "loss (nats/token)",
           [("all tasks", _line(records, "eval", "loss"))]
           + [(t, _line(records, "eval", "task_loss", t)) for t in _tasks(records, "eval", "task_loss")])
    ks = sorted({int(k[len("pass@"):]) for r in records if r.get("kind") == "code_eval" for k in r
                 if k.startswith("pass@") and k[len("pass@"):].isdigit()})
    for k in ks:
        figure(f"pass_at_{k}", f"pass@{k} per task (code evaluation)", f"pass@{k}",
               [("all tasks", _line(records, "code_eval", f"pass@{k}"))]
               + [(t, _line(records, "code_eval", f"task_pass@{k}", t))
                  for t in _tasks(records, "code_eval", f"task_pass@{k}")])
    figure("lr", "learning rate", "lr", [("lr", _line(records, "train", "lr"))])
    figure("tokens_per_s", "training throughput", "tokens/s (all ranks)",
           [("tokens/s", _line(records, "train", "tokens_per_s"))])
    return figures


def write_run_plots(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draw every figure of :func:`plot_series` into ``out_dir`` (default ``run_dir/plots``): NAME.png and its
    NAME.json sidecar. Returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, spec in plot_series(read_metrics(run_dir)).items():
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        for line in spec["lines"]:
            overall = line["label"] == "all tasks"
            ax.plot(line["steps"], line["values"], label=line["label"], marker="o" if len(line["steps"]) < 30 else None,
                    markersize=3, linewidth=2.5 if overall else 1.5, color="black" if overall else None)
        ax.set(title=f"{spec['title']} - {Path(run_dir).resolve().name}", xlabel=spec["xlabel"], ylabel=spec["ylabel"])
        ax.grid(alpha=0.3)
        if len(spec["lines"]) > 1:
            ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        plt.close(fig)
        (out / f"{name}.json").write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
        written.append(out / f"{name}.png")
    return written


def write_plots_at_end(run_dir: str | os.PathLike) -> str:
    """What a run does at its end: the PNGs, or a line saying why there are none (never an error)."""
    try:
        written = write_run_plots(run_dir)
    except ImportError:
        return "note: matplotlib is not installed (pip install 'mft[plot]'): no plots; `mft plot` draws them later"
    except Exception as e:  # noqa: BLE001 - a figure is not worth failing a finished run for
        return f"warning: plots not written ({type(e).__name__}: {e}); metrics.jsonl holds the values"
    if not written:
        return "plots: none (metrics.jsonl has no steps)"
    return f"plots: {', '.join(p.name for p in written)} in {Path(run_dir) / 'plots'}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mft plot`` command line."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's output_dir (its metrics.jsonl)")
    parser.add_argument("--output", metavar="DIR", help="where the PNGs go (default: RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    try:
        written = write_run_plots(args.run_dir, args.output)
    except FileNotFoundError as e:
        print(f"mft plot: {e}", file=sys.stderr)
        return 1
    except ImportError:
        print("mft plot: matplotlib is not installed: pip install 'mft[plot]'", file=sys.stderr)
        return 1
    if not written:
        print(f"mft plot: {Path(args.run_dir) / 'metrics.jsonl'} has no steps to plot yet", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0
