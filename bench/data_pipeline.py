"""Data pipeline speed: conversations/s of ``build_mft_data`` with a cold and a warm tokenisation cache.

    python bench/data_pipeline.py [--conversations 100000] [--tasks 4] [--workers N] [--seq-len 2048]

Writes a synthetic multi-task set (multi-turn ``chat_rounds``, ``prompt``/``answer`` and ``instruction``/``output``
records with code-like answers, ~150-600 tokens each) to a temporary directory and builds it twice with the real
SmolLM2-135M-Instruct tokenizer:

* cold: an empty cache directory: parse, validate, render and tokenise in worker processes, write the cache;
* warm: the same files again: hash them, memory-map the cached arrays, split.

The issue's target: warm >= 20x faster than cold. Run by hand (not by CI); paste the output with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = ("list dict value key index frame column row sort filter group merge count mean total string number "
         "parse format return result items first last empty missing unique order table").split()


def synthetic_record(rng: random.Random, i: int) -> dict:
    def sentence(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    def code(n: int) -> str:
        body = "\n".join(f"    {rng.choice(WORDS)}_{k} = {rng.choice(WORDS)}[{k}] + {rng.randint(0, 99)}" for k in range(n))
        return f"```python\ndef task_{i}(data):\n{body}\n    return data\n```"

    kind = i % 3
    if kind == 0:
        rounds = []
        if rng.random() < 0.3:
            rounds.append({"role": "system", "content": sentence(8)})
        for _ in range(rng.randint(1, 3)):
            rounds += [{"role": "human", "content": sentence(rng.randint(10, 40))},
                       {"role": "bot", "content": code(rng.randint(3, 12))}]
        return {"id": i, "chat_rounds": rounds}
    if kind == 1:
        return {"id": i, "prompt": sentence(rng.randint(10, 60)), "answer": code(rng.randint(3, 20))}
    return {"id": i, "instruction": sentence(rng.randint(10, 40)), "input": "", "output": code(rng.randint(3, 20))}


def write_dataset(root: Path, conversations: int, tasks: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    paths = []
    for t in range(tasks):
        d = root / f"task_{t}"
        d.mkdir(parents=True)
        n = conversations // tasks + (t < conversations % tasks)
        with open(d / "train.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps(synthetic_record(rng, t * 10_000_000 + i)) + "\n")
        paths.append(str(d))
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="tokenisation processes (default: min(8, cpus))")
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from mft_components.assets import prepare_smollm2
    from mft_components.data import build_mft_data
    from mft_components.data.stats import task_stats, total_stats

    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
    tmp = Path(tempfile.mkdtemp(prefix="mft-bench-data-"))
    try:
        t0 = time.perf_counter()
        paths = write_dataset(tmp / "data", args.conversations, args.tasks)
        size = sum(f.stat().st_size for f in (tmp / "data").rglob("*.jsonl"))
        print(f"wrote {args.conversations:,} synthetic conversations in {args.tasks} tasks "
              f"({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")

        def build():
            return build_mft_data(tokenizer, data_paths=paths, cache_dir=str(tmp / "cache"), seq_len=args.seq_len,
                                  valid_ratio=0.01, num_workers=args.workers)

        t0 = time.perf_counter()
        data = build()
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm_data = build()
        warm = time.perf_counter() - t0
        assert len(warm_data.train_samples) == len(data.train_samples)
        total = total_stats(task_stats(data))
        n = total["records"]
        workers = args.workers or min(8, os.cpu_count() or 1)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; workers: {workers}; "
              f"python {platform.python_version()}")
        print(f"tokens: {total['tokens']:,} ({total['tokens'] / n:.0f} per conversation)")
        print(f"{'':6}{'seconds':>10}{'conversations/s':>18}")
        print(f"{'cold':6}{cold:>10.2f}{n / cold:>18,.0f}")
        print(f"{'warm':6}{warm:>10.2f}{n / warm:>18,.0f}")
        ratio = cold / warm
        print(f"warm start is {ratio:.1f}x faster than cold (target >= 20x): {'PASS' if ratio >= 20 else 'FAIL'}")
        return 0 if ratio >= 20 else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
