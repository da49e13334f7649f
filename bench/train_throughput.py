"""Training throughput of mft against the stack MFTCoder users run, on the same model, data and machine.

    python bench/train_throughput.py                  # fp32 and bf16, every contender, appends to bench/RESULTS.md
    python bench/train_throughput.py --dtype fp32 --steps 3 --threads 2

Model: SmolLM2-135M-Instruct as the demo prepares it. Data: the demo's dataframebench task directories, rendered
with MFTCoder's template. LoRA rank 16 on all linear layers. Every contender trains on exactly the same samples,
step by step (the same real tokens per optimizer step), two warm-up steps (allocator, optimizer state, and for a
compiled model the compilation and the one recompilation for a new micro-batch shape), then timed steps.

Contenders, each in its own process, one after another:
  mft-pack      mft's MFTModel + TaskWeightedLoss, packing: pack (rows of seq_len), attn_implementation
                sdpa_varlen (causal SDPA per sample, no mask; `--mft-attn sdpa` for transformers' packed mask),
                compile: true (norms and MLPs; `--no-mft-compile` for eager)
  mft-padding   the same with packing: padding (one sample per row, padded to the micro-batch's longest)
  baseline      transformers + peft (get_peft_model, target_modules="all-linear"), dynamic padding to the longest
                sample of the micro-batch, full logits, per-task token-mean loss (MFTCoder's case3), AdamW

Printed: real tokens/s, loss tokens/s, peak RSS, ratios to the baseline, and model FLOPs utilisation against the
machine's measured matmul rate in the same dtype.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
CONTENDERS = ("mft-pack", "mft-padding", "baseline")
# The same for every contender and flag, so runs with and without compile time the same steps.
WARMUP_STEPS = 2
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


# ------------------------------------------------------------------------------------------- shared workload


def load_workload(seq_len: int, tokens_per_step: int, num_steps: int, seed: int):
    """The steps every contender trains on: lists of (input_ids, loss_mask, task_id), same order for everyone."""
    from transformers import AutoTokenizer

    from mft_components.data import build_mft_data
    from mft_components.assets import prepare_dataframebench, prepare_smollm2

    model_dir = prepare_smollm2()
    data_dir = prepare_dataframebench()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = build_mft_data(
        tokenizer, data_paths=sorted(str(p) for p in Path(data_dir).iterdir() if p.is_dir()),
        seq_len=seq_len, valid_ratio=0.0, seed=seed,
    )
    order = np.random.default_rng(seed).permutation(len(data.train_samples))
    steps, current, used = [], [], 0
    for index in order:
        sample = data.train_samples[index]
        n = len(sample.input_ids)
        if used + n > tokens_per_step and current:
            steps.append(current)
            current, used = [], 0
            if len(steps) == num_steps:
                break
        current.append(sample)
        used += n
    return model_dir, data.task_names, steps


def micro_batches_of(samples, max_rows_tokens: int):
    """Split one step's samples into micro-batches of at most `max_rows_tokens` padded tokens (padding modes)."""
    batches, current, longest = [], [], 0
    for sample in samples:
        n = len(sample.input_ids)
        if current and max(longest, n) * (len(current) + 1) > max_rows_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(sample)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


# ------------------------------------------------------------------------------------------------ contenders


def run_mft(args, packing: str) -> dict:
    from mft_components.loss import TaskWeightedLoss
    from mft_components.models import build_model
    from mft_components.data.packing import collate, pack_samples

    model_dir, task_names, steps = load_workload(args.seq_len, args.tokens_per_step, args.steps + WARMUP_STEPS,
                                                 args.seed)
    model = build_model(model_dir, method="lora", lora=LORA, dtype=args.dtype, attn_implementation=args.mft_attn,
                        compile=args.mft_compile)
    model.train()
    loss_fn = TaskWeightedLoss(mode="task")
    loss_fn.setup(task_names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step_batches(samples):
        if packing == "pack":
            rows = pack_samples(samples, args.seq_len, "pack")
            # Each row padded to its own length: packing one step's samples leaves a partial last row that an
            # epoch-wide packing (what the recipe does: rows >= 97% full on this data) would not have.
            return [collate([[samples[i] for i in row]]) for row in rows]
        return [collate([[s] for s in mb]) for mb in micro_batches_of(samples, args.seq_len)]

    def train_step(samples):
        batches = step_batches(samples)
        counts = loss_fn.step_counts(batches)
        for batch in batches:
            token_losses, aux = model(batch, **loss_fn.ce_kwargs)
            loss_fn(token_losses, batch, counts).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(train_step, steps, WARMUP_STEPS)


def run_baseline(args) -> dict:
    """transformers + peft as MFTCoder runs them: full logits, dynamic padding, per-task token-mean per micro-batch."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir, task_names, steps = load_workload(args.seq_len, args.tokens_per_step, args.steps + WARMUP_STEPS,
                                                 args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(
        model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear")
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pad_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    def collate_padded(samples):
        longest = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
        attention = torch.zeros((len(samples), longest), dtype=torch.long)
        labels = torch.full((len(samples), longest), -100, dtype=torch.long)
        tasks = torch.full((len(samples),), -1, dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            ids[row, :n] = torch.as_tensor(s.input_ids, dtype=torch.long)
            attention[row, :n] = 1
            labels[row, :n] = torch.where(torch.as_tensor(s.loss_mask), ids[row, :n], -100)
            tasks[row] = s.task_id
        return ids, attention, labels, tasks

    def train_step(samples):
        batches = micro_batches_of(samples, args.seq_len)
        for mb in batches:
            ids, attention, labels, tasks = collate_padded(mb)
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            token_loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none", ignore_index=-100)
            mask = (shift_labels != -100).float()
            task_of_token = tasks[:, None].expand_as(shift_labels)
            per_task = []
            for t in tasks.unique():
                m = mask * (task_of_token == t)
                if m.sum() > 0:
                    per_task.append((token_loss * m).sum() / m.sum())
            (torch.stack(per_task).mean() / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(train_step, steps, WARMUP_STEPS)


def time_steps(train_step, steps, warmup: int) -> dict:
    start = time.perf_counter()
    for samples in steps[:warmup]:  # allocator, kernels, optimizer state, compilation
        train_step(samples)
    warmup_seconds = time.perf_counter() - start
    timed = steps[warmup:]
    real = loss = 0
    cpu_start = time.process_time()
    start = time.perf_counter()
    for samples in timed:
        train_step(samples)
        real += sum(len(s.input_ids) for s in samples)
        loss += sum(int(np.asarray(s.loss_mask).sum()) for s in samples)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    contexts = [len(s.input_ids) for samples in timed for s in samples]
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "real_tokens": real,
        "loss_tokens": loss,
        "real_tokens_per_s": real / seconds,
        "loss_tokens_per_s": loss / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mean_sample_tokens": float(np.mean(contexts)),
        "warmup_seconds": warmup_seconds,
    }


# ------------------------------------------------------------------------------------------------ the ceiling


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """The machine's matmul ceiling: the best of `repeats` timings (a slower one measures the load, not the CPU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_flops_per_token(model_dir: Path, mean_sample_tokens: float) -> float:
    """LoRA training FLOPs per real token: 4 x parameters (forward, input gradients; frozen weights get none)
    plus attention scores and values, forward and backward, over half the sample on average (causal)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    d, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    inter = config["intermediate_size"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * (d // config["num_attention_heads"])
    params = layers * (2 * d * d + 2 * d * kv + 3 * d * inter) + vocab * d
    attention = 3 * 4 * layers * d * (mean_sample_tokens / 2)
    return 4 * params + attention


# ------------------------------------------------------------------------------------------------------ main


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result = run_baseline(args) if args.worker == "baseline" else run_mft(args, args.worker.split("-")[1])
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="real tokens per optimizer step")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mft-attn", default="sdpa_varlen", help="attn_implementation of the mft contenders")
    parser.add_argument("--no-mft-compile", dest="mft_compile", action="store_false",
                        help="run the mft contenders eagerly (default: compile: true)")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    torch.set_num_threads(args.threads)
    from mft_components.assets import prepare_dataframebench, prepare_smollm2

    model_dir = prepare_smollm2()
    prepare_dataframebench()
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    rows = []
    for dtype in dtypes:
        rate = matmul_rate(torch.bfloat16 if dtype == "bf16" else torch.float32)
        results = {}
        for name in args.contenders.split(","):
            cmd = [sys.executable, __file__, "--worker", name, "--dtype", dtype, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--seq-len", str(args.seq_len),
                   "--tokens-per-step", str(args.tokens_per_step), "--seed", str(args.seed),
                   "--mft-attn", args.mft_attn] + ([] if args.mft_compile else ["--no-mft-compile"])
            print(f"[{dtype}] {name} ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            results[name] = json.loads(line[len("RESULT "):])
        base = results.get("baseline")
        for name, r in results.items():
            flops = model_flops_per_token(model_dir, r["mean_sample_tokens"]) * r["real_tokens_per_s"]
            rows.append({
                "dtype": dtype, "contender": name, **r, "matmul_gflops": rate / 1e9, "mfu": flops / rate,
                "speedup": r["real_tokens_per_s"] / base["real_tokens_per_s"] if base else float("nan"),
                "memory_ratio": r["peak_rss_mib"] / base["peak_rss_mib"] if base else float("nan"),
            })
    table = format_table(rows)
    print(table)
    if not args.no_record:
        record(args, table)


def format_table(rows) -> str:
    lines = [
        "| dtype | contender | real tok/s | loss tok/s | CPU s / 1k real tok | peak RSS MiB | tok/s vs baseline "
        "| RSS vs baseline | matmul GFLOP/s | MFU | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['contender']} | {r['real_tokens_per_s']:.0f} | {r['loss_tokens_per_s']:.0f} | "
            f"{1000 * r['cpu_seconds'] / r['real_tokens']:.1f} | "
            f"{r['peak_rss_mib']:.0f} | {r['speedup']:.2f}x | {r['memory_ratio']:.2f}x | {r['matmul_gflops']:.0f} | "
            f"{100 * r['mfu']:.1f}% | {r['warmup_seconds']:.0f} |"
        )
    return "\n".join(lines)


def record(args, table: str) -> None:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "-"
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    header = (
        f"\n## {datetime.date.today().isoformat()} train_throughput\n\n"
        f"CPU: {cpu}, {os.cpu_count()} cores, threads {args.threads}. torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft_version}.\n"
        f"SmolLM2-135M-Instruct, LoRA r=16 all-linear, seq_len {args.seq_len}, {args.tokens_per_step} real tokens "
        f"per step, {WARMUP_STEPS} warm-up + {args.steps} timed steps, mft attn_implementation "
        f"{args.mft_attn}, mft compile {args.mft_compile}. "
        f"Load average at the end: {Path('/proc/loadavg').read_text().split()[:3]}.\n\n"
    )
    with open(BENCH_DIR / "RESULTS.md", "a") as f:
        f.write(header + table + "\n")


if __name__ == "__main__":
    main()
