"""A task from a Parquet file against the same task as JSONL: time to the first training batch and peak RSS.

    python bench/datasets_files.py [--rows 1000000] [--workers N] [--seq-len 512]

Writes one task of ``--rows`` short ``prompt``/``answer`` records twice, as a JSONL file (mft's own line reader)
and as a Parquet file (read with `datasets`, memory-mapped: ``mft_components/data/tables.py``), then, for each, in
a fresh process: ``build_mft_data`` with the real SmolLM2-135M-Instruct tokenizer and the first batch of the
training loader, timed; the process's peak RSS (``ru_maxrss``) is read at the end.

* cold: an empty cache: read, parse, tokenise in worker processes, write the tokenisation cache (for Parquet also
  `datasets`' one-time conversion into Arrow files);
* warm: the same file again: hash it, memory-map the cached arrays, split, first batch.

Ratios are Parquet / JSONL in the same run. Run by hand (not by CI); paste the output with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORDS = ("list dict value key index frame column row sort filter group merge count mean total string number "
         "parse format return result items first last empty missing unique order table").split()


def write_task(root: Path, rows: int) -> tuple[Path, Path]:
    """The same rows as task/train.jsonl and task.parquet (written in batches: a 1M-row list is not kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    jsonl, parquet = root / "jsonl_task" / "train.jsonl", root / "parquet_task.parquet"
    jsonl.parent.mkdir(parents=True)
    writer = None
    with open(jsonl, "w", encoding="utf-8") as f:
        for start in range(0, rows, 50_000):
            batch = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + f" #{i}",
                      "answer": f"def f_{i}(x):\n    return x.{rng.choice(WORDS)}()"}
                     for i in range(start, min(rows, start + 50_000))]
            f.write("".join(json.dumps(r) + "\n" for r in batch))
            table = pa.Table.from_pylist(batch)
            writer = writer or pq.ParquetWriter(parquet, table.schema)
            writer.write_table(table)
    writer.close()
    return jsonl.parent, parquet


def measure(path: str, cache: str, workers: int, seq_len: int) -> None:
    """In this (fresh) process: build the data, take the first batch; print a JSON line."""
    from mft_components.assets import prepare_smollm2
    from mft_components.data.build import build_mft_data
    from mft_components.data.sampling import build_train_loader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    start = time.perf_counter()
    data = build_mft_data(tokenizer, data_paths=[path], cache_dir=cache, num_workers=workers, seq_len=seq_len,
                          valid_ratio=0.0)
    built = time.perf_counter()
    batch = next(iter(build_train_loader(data, micro_batch_size=1)))
    first = time.perf_counter()
    assert batch["tokens"].numel() if "tokens" in batch else True
    print(json.dumps({"build_s": built - start, "first_batch_s": first - start, "samples": len(data.train_samples),
                      "rss_before_mb": rss_before,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}))


def run_child(path: Path, cache: Path, workers: int, seq_len: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), str(cache), str(workers), str(seq_len)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, cache, workers, seq_len = args.child
        measure(path, cache, int(workers), int(seq_len))
        return
    import datasets
    import torch

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"datasets {datasets.__version__}; {args.rows:,} rows, {args.workers} tokenisation workers, "
          f"seq_len {args.seq_len}")
    root = Path(tempfile.mkdtemp(prefix="mft-bench-datasets-"))
    try:
        t = time.perf_counter()
        jsonl, parquet = write_task(root, args.rows)
        print(f"wrote the task in {time.perf_counter() - t:.1f} s: JSONL {sum(f.stat().st_size for f in jsonl.iterdir()) / 2**20:.0f} MB, "
              f"Parquet {parquet.stat().st_size / 2**20:.0f} MB")
        results = {}
        for name, path in (("jsonl", jsonl), ("parquet", parquet)):
            cache = root / f"cache_{name}"
            results[name] = {"cold": run_child(path, cache, args.workers, args.seq_len),
                             "warm": run_child(path, cache, args.workers, args.seq_len)}
        print(f"\n{'':8}{'':6}{'first batch s':>14}{'peak RSS MB':>13}{'samples':>10}")
        for phase in ("cold", "warm"):
            for name in ("jsonl", "parquet"):
                r = results[name][phase]
                print(f"{name:8}{phase:6}{r['first_batch_s']:14.1f}{r['peak_rss_mb']:13.0f}{r['samples']:10,}")
            j, p = results["jsonl"][phase], results["parquet"][phase]
            print(f"{'ratio':8}{phase:6}{p['first_batch_s'] / j['first_batch_s']:14.2f}"
                  f"{p['peak_rss_mb'] / j['peak_rss_mb']:13.2f}   (Parquet / JSONL)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
