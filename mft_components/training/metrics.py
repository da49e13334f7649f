"""What a run tells people while it trains: the progress bar, ``metrics.jsonl``, TensorBoard, tokens per second.

Everything that prints or writes is active on rank 0 only.

``output_dir/metrics.jsonl`` holds one JSON object per line::

    {"kind": "train", "step": 10, "loss": 1.93, "task_loss": {"pandas": 1.8, ...}, "lr": 2e-4, "grad_norm": 0.7,
     "tokens_per_s": 5120.0, "peak_memory_gb": 3.1, ...}
    {"kind": "eval", "step": 10, "loss": 1.88, "task_loss": {...}, "task_perplexity": {...}, "best_step": 10}

TensorBoard (``output_dir/tb``) gets the same numbers as scalars: ``train/loss``, ``train/task_loss/pandas``, ...
W&B and MLflow (``metric_loggers``) get them from a background thread (``loggers.py``).
Evaluation is ``evaluate.py``, early stopping and the non-finite guard ``guards.py``, the final lines ``summary.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mft_components.device import to_device
from mft_components.distributed import all_reduce_sum, is_distributed
from mft_components.training.loggers import ExternalLoggers

__all__ = ["MetricLogger", "ProgressBar", "Throughput", "read_log_step"]


class MetricLogger:
    """Appends metrics to ``output_dir/metrics.jsonl`` and TensorBoard (``output_dir/tb``); a no-op off rank 0.

    Args:
        output_dir: the run's output directory.
        enabled: False on ranks other than 0.
        tensorboard: also write TensorBoard events (skipped with a note when tensorboard is not installed).
        start_step: the step this run starts from (its checkpoint's, 0 for a fresh start): the rows of later steps
            (and at a fresh start every row), which a run that stopped after its last checkpoint wrote and this
            one writes again, are dropped from metrics.jsonl, and TensorBoard purges their events. None appends
            to what is there.
        external: W&B / MLflow / user loggers (``loggers.build_metric_loggers``), run on a background thread.
        config: the resolved config, their runs' parameters.
        run_ids: their run ids from the checkpoint this run resumes: the same runs continue.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 start_step: int | None = None, external: list | None = None, config: dict | None = None,
                 run_ids: dict[str, str] | None = None):
        self.enabled = enabled
        self._tb = None
        self._file = None
        self._external = None
        if not enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if start_step is not None:
            dropped = _drop_rows_after(output_dir / "metrics.jsonl", start_step)
            if dropped:
                print(f"note: {output_dir / 'metrics.jsonl'}: dropped {dropped} row(s) of steps after {start_step}, "
                      "written by a run that stopped after its last checkpoint (this run writes them again)",
                      file=sys.stderr)
        self._file = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = {} if start_step is None else {"purge_step": start_step + 1 if start_step else 0}
                self._tb = SummaryWriter(str(output_dir / "tb"), **purge)
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        if external:
            self._external = ExternalLoggers(external, output_dir, config or {}, run_ids)

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        """Write one record. Nested dicts (per-task values) become ``kind/key/task`` TensorBoard scalars."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **metrics}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)) and v is not None:
                            self._tb.add_scalar(f"{kind}/{key}/{sub}", v, step)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._external is not None:
            self._external.log(kind, step, metrics)

    def run_ids(self) -> dict[str, str]:
        """The W&B / MLflow run ids, for the recipe state (a resume continues those runs)."""
        return self._external.run_ids() if self._external is not None else {}

    def summary(self, values: dict[str, Any], artifact_dir: Path | None = None) -> None:
        """The run's final summary to W&B / MLflow, and ``artifact_dir`` to the loggers that were asked for it."""
        if self._external is not None:
            self._external.summary(values, artifact_dir)

    def close(self, ok: bool = True) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._external is not None:
            self._external.close(ok)
            self._external = None


def _drop_rows_after(path: Path, step: int) -> int:
    """Keep the rows of steps up to ``step`` (none when it is 0), atomically; returns how many were dropped (a
    line cut short by a kill counts as one)."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            row_step = None
        if step and isinstance(row_step, int) and row_step <= step:
            kept.append(line + "\n")
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class ProgressBar:
    """tqdm bar on rank 0 showing step, loss, learning rate and tokens/s; tqdm adds the ETA.

    Args:
        total_steps: optimizer steps of the whole run.
        initial: the step a resumed run starts from.
        enabled: False on ranks other than 0.
    """

    def __init__(self, total_steps: int, initial: int = 0, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout,
                             mininterval=0.5 if sys.stdout.isatty() else 10.0)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self._bar is None:
            return
        self._bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} tok/s {tokens_per_s:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def write(self, text: str) -> None:
        """Print a line above the bar (evaluations, checkpoints) without breaking it."""
        if self._bar is not None:
            self._bar.write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Throughput:
    """Tokens per second, over all ranks, between two calls of :meth:`rate`.

    Args:
        device: where the token count is all-reduced (the model's device: NCCL reduces CUDA tensors).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self._t, self._tokens = time.perf_counter(), 0
        self.device = torch.device(device)

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def add_step(self, micro_batches: list[dict]) -> None:
        """Count this rank's real (non-padding) tokens of a step; pass the micro-batches still on the host (no
        device is waited for). The count is reduced over ranks in :meth:`rate`."""
        self._tokens += sum(int((b["sample_ids"] >= 0).sum()) for b in micro_batches)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints) is not training time: tokens/s leaves it out."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._t += time.perf_counter() - start

    @property
    def tokens(self) -> int:
        """This rank's real tokens since the last :meth:`rate`."""
        return self._tokens

    def rate(self, total_tokens: int | None = None) -> float:
        """Real tokens per second of all ranks since the last call (collective: every rank calls it, unless it
        passes ``total_tokens``, :attr:`tokens` already summed over the ranks)."""
        tokens = self._tokens if total_tokens is None else int(total_tokens)
        if total_tokens is None and is_distributed():
            tokens = int(all_reduce_sum(torch.tensor([tokens], device=self.device)).item())
        now = time.perf_counter()
        rate = tokens / max(now - self._t, 1e-9)
        self._t, self._tokens = now, 0
        return rate


def read_log_step(loss_fn: Any, grad_norm: torch.Tensor, guard: "NonFiniteGuard", throughput: Throughput,
                  group=None) -> dict[str, float]:
    """Everything a log step reports, with one all-reduce and one device-to-host copy (collective).

    The loss's per-task sums and this rank's token count are summed over ranks together; with the step's task
    token counts, the global gradient norm and the non-finite guard's record they come back in one ``tolist()``,
    the only point of the step where the host waits for the device.

    Returns:
        ``loss_fn.step_metrics()``'s values plus ``grad_norm`` and ``tokens_per_s``.

    Raises:
        NonFiniteLossError: a step since the last check was not finite (``guard.check``).
    """
    sums = loss_fn.step_sums()
    device = sums.device
    summed = all_reduce_sum(torch.cat([sums, to_device(torch.tensor([float(throughput.tokens)], dtype=torch.float64),
                                                       device)]), group)
    norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    counts = loss_fn.step_token_counts()
    values = torch.cat([summed, counts, norm.detach().double().reshape(1).to(device), guard.pending(device)]).tolist()
    n_sums, n_counts = sums.numel(), counts.numel()
    guard.check(values[-3:])
    metrics = loss_fn.step_metrics(values=values[:n_sums] + values[n_sums + 1:n_sums + 1 + n_counts])
    metrics["grad_norm"] = values[n_sums + 1 + n_counts]
    metrics["tokens_per_s"] = throughput.rate(total_tokens=int(values[n_sums]))
    return metrics
