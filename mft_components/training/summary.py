"""The lines a run prints when it ends: steps, time, why it stopped, the best step and its per-task values."""

from __future__ import annotations

import math
import os
from pathlib import Path

from mft_components.training.evaluate import EvalResult
from mft_components.training.guards import EarlyStopping

__all__ = ["format_summary", "summary_values"]


def format_summary(*, steps: int, seconds: float, stop_reason: str, early_stopping: EarlyStopping,
                   best_eval: EvalResult | None, checkpoints: list[Path], output_dir: str | os.PathLike,
                   best_task_values: dict[str, float] | None = None) -> str:
    """The lines printed when a run ends: steps, time, why it stopped, best step and its per-task values: the
    validation losses of ``best_eval``, or ``best_task_values`` (per-task values of ``early_stopping.metric``,
    e.g. pass@1, when that decides the best step instead of the loss)."""
    lines = [f"finished: {steps} steps in {seconds:.0f}s ({stop_reason})"]
    if early_stopping.best_step is not None:
        lines.append(f"best step: {early_stopping.best_step} ({early_stopping.metric} {early_stopping.best_loss:.4f})")
    if best_task_values is not None:
        width = max(map(len, best_task_values), default=4)
        lines += [f"  {task:<{width}}  {early_stopping.metric} {value:.4f}" for task, value in best_task_values.items()]
    if best_eval is not None:
        width = max(map(len, best_eval.task_loss), default=4)
        for task, loss in best_eval.task_loss.items():
            lines.append(f"  {task:<{width}}  loss {loss:.4f}  ppl {math.exp(min(loss, 50.0)):.2f}")
    lines.append(f"checkpoints: {', '.join(p.name for p in checkpoints) or 'none'} in {output_dir}")
    lines.append(f"metrics: {Path(output_dir) / 'metrics.jsonl'}, TensorBoard: {Path(output_dir) / 'tb'}")
    return "\n".join(lines)


def summary_values(*, steps: int, seconds: float, stop_reason: str, early_stopping: EarlyStopping,
                   best_eval: EvalResult | None, best_task_values: dict[str, float] | None = None,
                   **_: object) -> dict[str, object]:
    """What :func:`format_summary` prints, as the flat values W&B's run summary and MLflow take (it accepts the
    same arguments): ``steps``, ``seconds``, ``stop_reason``, ``best_step``, ``best/<metric>`` and per task
    ``best/<metric>/<task>`` (and ``best/loss/<task>`` from ``best_eval``)."""
    values: dict[str, object] = {"steps": steps, "seconds": round(seconds, 3), "stop_reason": stop_reason}
    metric = early_stopping.metric
    if early_stopping.best_step is not None:
        values["best_step"] = early_stopping.best_step
        values[f"best/{metric}"] = early_stopping.best_loss
    for task, value in (best_task_values or {}).items():
        values[f"best/{metric}/{task}"] = value
    if best_eval is not None:
        values.update({f"best/loss/{task}": loss for task, loss in best_eval.task_loss.items()})
    return values
