"""What W&B and MLflow logging costs a training step (target: at most 1% of the step).

    python bench/metric_loggers.py [--seq-len 256] [--steps 8] [--blocks 3] [--tasks 6]

One CPU process builds what the demo trains (SmolLM2-135M-Instruct, LoRA r16 on q/k/v/o/gate/up/down, fp32) and
times, in the same run, blocks of ``--steps`` training steps (forward, backward, AdamW step of one ``--seq-len``
token row), each followed by ``MetricLogger.log`` of a training record with ``--tasks`` per-task losses, token
counts and weights (what log_every_n_steps: 1 writes), alternating:

* baseline: metrics.jsonl only (TensorBoard off);
* loggers: metrics.jsonl + W&B (offline) + MLflow (local SQLite store), as ``metric_loggers: [wandb, mlflow]``
  sets up; their work runs on the background thread while the next steps train.

Prints the median step time of each, their ratio, and what a ``log`` call itself holds the training thread for.
Setting the runs up (wandb.init, the MLflow store's tables: seconds) happens on the thread before the first record
and is not in a step; it is printed apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's descendants so far: wandb's own service processes."""
    parents, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    mine, found = {os.getpid()}, True
    while found:
        new = {pid for pid, ppid in parents.items() if ppid in mine and pid not in mine}
        found = bool(new)
        mine |= new
    return sum(cpu[pid] for pid in mine - {os.getpid()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="blocks of each kind, alternating")
    parser.add_argument("--tasks", type=int, default=6)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")

    from mft_components.assets import prepare_smollm2
    from mft_components.models import build_model
    from mft_components.training.loggers import build_metric_loggers
    from mft_components.training.metrics import MetricLogger

    torch.manual_seed(0)
    model = build_model(prepare_smollm2(), method="lora", dtype="fp32", lora={"rank": 16, "alpha": 32})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1),
             "position_ids": torch.arange(args.seq_len).unsqueeze(0), "sample_ids": torch.zeros_like(ids)}
    tasks = [f"task{i}" for i in range(args.tasks)]

    def record(step: int) -> dict:
        values = {"loss": 1.0 / step, "grad_norm": 0.5, "tokens_per_s": 1000.0, "lr": 1e-4, "epoch": 0,
                  "peak_memory_gb": 0.0}
        for t in tasks:
            values.update({f"loss/{t}": 1.0 / step, f"tokens/{t}": 100, f"weight/{t}": 1.0 / len(tasks)})
        return values

    with tempfile.TemporaryDirectory() as tmp:
        config = {"output_dir": tmp, "optimizer": {"lr": 1e-4}, "metric_loggers": ["wandb", "mlflow"]}
        baseline_log = MetricLogger(Path(tmp) / "baseline", tensorboard=False)
        start = time.perf_counter()
        external, _ = build_metric_loggers(["wandb", "mlflow"])
        loggers_log = MetricLogger(Path(tmp) / "loggers", tensorboard=False, external=external, config=config)
        loggers_log.run_ids()  # waits for both runs to have started
        setup_s = time.perf_counter() - start
        thread_clock = time.pthread_getcpuclockid(loggers_log._external._thread.ident)
        thread_cpu_start, children_start = time.clock_gettime(thread_clock), children_cpu_s()

        def train_step() -> None:
            losses, _ = model(batch)
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        train_step()  # warm-up
        times: dict[str, list[float]] = {"baseline": [], "loggers": []}
        log_call_s: dict[str, list[float]] = {"baseline": [], "loggers": []}
        step = 0
        for _ in range(args.blocks):
            for name, logger in (("baseline", baseline_log), ("loggers", loggers_log)):
                for _ in range(args.steps):
                    step += 1
                    t0 = time.perf_counter()
                    train_step()
                    t1 = time.perf_counter()
                    logger.log("train", step, record(step))
                    t2 = time.perf_counter()
                    times[name].append(t2 - t0)
                    log_call_s[name].append(t2 - t1)
        loggers_log._external._queue.join()  # every record logged
        thread_cpu_s = time.clock_gettime(thread_clock) - thread_cpu_start
        children_s = children_cpu_s() - children_start
        start = time.perf_counter()
        loggers_log.close()
        close_s = time.perf_counter() - start
        baseline_log.close()

    base, with_loggers = statistics.median(times["baseline"]), statistics.median(times["loggers"])
    call = statistics.median(log_call_s["loggers"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; one process (CPU)")
    print(f"training step + log (SmolLM2-135M LoRA r16, {args.seq_len} tokens, {args.tasks} tasks, median of "
          f"{len(times['baseline'])}): metrics.jsonl only {base * 1e3:.0f} ms, + W&B offline + MLflow SQLite "
          f"{with_loggers * 1e3:.0f} ms: ratio {with_loggers / base:.3f}")
    print(f"MetricLogger.log on the training thread (median): metrics.jsonl only "
          f"{statistics.median(log_call_s['baseline']) * 1e6:.0f} us, with W&B + MLflow {call * 1e6:.0f} us "
          f"= {call / base:.2e} of a step")
    per_record = thread_cpu_s / len(times["loggers"])
    print(f"logger thread CPU time per record (flatten, W&B log, MLflow log_batch; not wandb-core's own process): "
          f"{per_record * 1e3:.1f} ms = {per_record / base:.2e} of a step")
    per_record = children_s / len(times["loggers"])
    print(f"wandb's service processes (wandb-core, system monitor) CPU time per record, all steps of both kinds: "
          f"{per_record * 1e3:.1f} ms = {per_record / base:.2e} of a step")
    print(f"outside the steps, on the logger thread: starting both runs {setup_s:.1f} s; finishing them "
          f"(queued records, wandb finish, MLflow terminate) {close_s:.1f} s")


if __name__ == "__main__":
    main()
