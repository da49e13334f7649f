"""What agreeing on a stop step costs: the per-step all-reduce of the SIGTERM flag against a training step.

    python bench/stop_signal_cost.py [--ranks 2] [--seq-len 512] [--steps 6] [--calls 2000]

Spawns ``--ranks`` CPU processes (gloo), as a torchrun run on a CPU has them. Each builds what the demo trains
(SmolLM2-135M-Instruct, LoRA r16 on q/k/v/o/gate/up/down, fp32, FSDP2 over the ranks) and times, in the same run:

* a training step: forward, backward and AdamW step of one ``--seq-len``-token row per rank (the baseline);
* ``StopOnSignal.agreed()``: the all-reduce of one number on its own gloo group that every rank runs once per
  optimizer step (``mft_components/training/preemption.py``), ``--calls`` times.

Prints both and their ratio. On a GPU the flag stays on the CPU (the side group is gloo whatever the training
backend), so it adds no device sync; its latency there is that of a TCP round trip between the ranks' hosts.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def worker(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.ranks), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ranks))
    from mft_components.assets import prepare_smollm2
    from mft_components.distributed import destroy_distributed, init_distributed
    from mft_components.models import build_model
    from mft_components.training.preemption import StopOnSignal

    _, _, device = init_distributed(600)
    torch.manual_seed(0)
    model = build_model(prepare_smollm2(), method="lora", dtype="fp32", distributed=True, device=device,
                        lora={"rank": 16, "alpha": 32})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 49152, (1, args.seq_len), generator=torch.Generator().manual_seed(rank))
    batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1),
             "position_ids": torch.arange(args.seq_len).unsqueeze(0), "sample_ids": torch.zeros_like(ids)}

    step_s = []
    for i in range(args.steps + 1):  # the first one warms up
        start = time.perf_counter()
        losses, _ = model(batch)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            step_s.append(time.perf_counter() - start)

    stop = StopOnSignal()
    stop.join_group(600)
    stop.start_training()
    for _ in range(50):
        stop.agreed()
    flag_s = []
    for _ in range(args.calls):
        start = time.perf_counter()
        stop.agreed()
        flag_s.append(time.perf_counter() - start)
    results[rank] = (statistics.median(step_s), statistics.median(flag_s), statistics.quantiles(flag_s, n=100)[98])
    destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    port = 29_000 + os.getpid() % 1000
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, port, results), nprocs=args.ranks, join=True)
        step, flag, flag_p99 = results[0]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; {args.ranks} ranks (gloo, CPU)")
    print(f"training step (SmolLM2-135M LoRA r16, {args.seq_len} tokens per rank, median of {args.steps}): "
          f"{step * 1e3:.0f} ms")
    print(f"stop flag all-reduce (median of {args.calls}): {flag * 1e6:.0f} us (99th percentile {flag_p99 * 1e6:.0f} "
          f"us) = {flag / step:.2e} of a step")


if __name__ == "__main__":
    main()
