"""DPO training throughput and peak memory of mft against TRL's DPOTrainer, same model, pairs and settings (CPU).

    python bench/preference_vs_trl.py                         # appends a dated section to bench/RESULTS.md
    python bench/preference_vs_trl.py --steps 2 --no-record

Model: SmolLM2-135M-Instruct as the demo prepares it, LoRA r16 on all linear layers (peft for TRL, mft's LoRALinear
for mft), fp32. Pairs: the demo's dataframebench conversations, prompt = every turn but the last, chosen = the
reference answer, rejected = the answer of the task's next conversation; rendered with mft's chat format once and
given to both contenders as the same token ids (TRL's ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, which
its ``DataCollatorForPreference`` takes). DPO (sigmoid, beta 0.1), the reference = the model with its adapters off
(TRL: ``ref_model=None`` with a PEFT model; mft: ``reference: auto``), AdamW, ``--pairs-per-step`` pairs per
optimizer step.

Contenders, each in its own process (peak RSS is the process's ``ru_maxrss``):
  mft   the recipe's step: pairs packed whole into rows of 2 x max_length tokens (``collate_pairs``), one row per
        micro-batch, adapters-off reference forward, ``MFTModel`` forward (chunked CE from hidden states),
        ``PreferenceLoss``, backward
  trl   TRL 1.16's step: ``DPOTrainer.compute_loss`` (policy and adapter-off reference forwards of chosen and
        rejected padded to the micro-batch's longest, its fused LM head) on micro-batches of ``--trl-batch`` pairs,
        backward; the Trainer loop around it is left out (in TRL's favour)

Printed: real (non-padding) tokens/s over the timed steps (both contenders process the same real tokens), peak
RSS, and the ratios mft / TRL.
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

import torch

BENCH_DIR = Path(__file__).resolve().parent
WARMUP_STEPS = 1
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def load_pairs(max_length: int, max_prompt_length: int, count: int, seed: int) -> tuple[Path, list[dict]]:
    """``count`` pairs as token ids (prompt, chosen, rejected; answers end with EOS), the same for both."""
    import random

    from transformers import AutoTokenizer

    from mft_components.assets import prepare_dataframebench, prepare_smollm2
    from mft_components.data import ChatFormat
    from mft_components.data.preference import tokenize_pair
    from mft_components.data.records import decode_record, parse_record

    model_dir, data_dir = prepare_smollm2(), prepare_dataframebench()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fmt = ChatFormat()
    candidates = []
    for task in sorted(p for p in Path(data_dir).iterdir() if p.is_dir()):
        conversations = [parse_record(decode_record(line))[1] for f in sorted(task.glob("*.jsonl"))
                         for line in f.read_bytes().splitlines() if line.strip()]
        candidates += [(a, b) for a, b in zip(conversations, conversations[1:] + conversations[:1])
                       if a[-1]["content"] != b[-1]["content"]]
    random.Random(seed).shuffle(candidates)
    pairs = []
    for a, b in candidates[:count]:  # tokenised only as many as are used
        p, (c, c_mask), (r, r_mask), _ = tokenize_pair(fmt, tokenizer, a[:-1], a[-1]["content"], b[-1]["content"],
                                                       max_length, max_prompt_length)
        # the answers through their last loss token (EOS): what TRL's completion is
        c, r = c[:max(i for i, m in enumerate(c_mask) if m) + 1], r[:max(i for i, m in enumerate(r_mask) if m) + 1]
        pairs.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return model_dir, pairs[:count]


def time_steps(train_step, steps: list[list[dict]]) -> dict:
    for step in steps[:WARMUP_STEPS]:
        train_step(step)
    timed, real = steps[WARMUP_STEPS:], 0
    start = time.perf_counter()
    for step in timed:
        train_step(step)
        real += sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in step)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "real_tokens": real, "real_tokens_per_s": real / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_mft(args, model_dir: Path, steps: list[list[dict]]) -> dict:
    from mft_components.data.packing import pack_samples
    from mft_components.data.preference import collate_pairs, pair_from_ids
    from mft_components.loss.preference import PreferenceLoss, pair_logps
    from mft_components.models import build_model, prepare_batch
    from mft_components.models.lora import adapters_disabled

    model = build_model(model_dir, method="lora", lora=LORA, dtype="fp32", attn_implementation="sdpa_varlen",
                        compile=False)
    model.train()
    loss_fn = PreferenceLoss(preference="dpo", beta=0.1, mode="sample")
    loss_fn.setup(["all"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cpu = torch.device("cpu")

    def train_step(examples):
        pairs = [pair_from_ids(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
        rows = pack_samples(pairs, 2 * args.max_length, "pack")
        batches = [collate_pairs([[pairs[i] for i in row]], pad_to=2 * args.max_length) for row in rows]
        counts = loss_fn.step_counts(batches)
        for host in batches:
            batch = prepare_batch(host, cpu, model.config)
            with torch.no_grad(), adapters_disabled(model):
                ref = pair_logps(model(batch, **loss_fn.ce_kwargs)[0], batch)[0]
            token_losses, _ = model(batch, **loss_fn.ce_kwargs)
            loss_fn(token_losses, batch, counts, ref_logps=ref).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(train_step, steps)


def run_trl(args, model_dir: Path, steps: list[list[dict]]) -> dict:
    import trl
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    config = trl.DPOConfig(output_dir=str(args.work / "trl"), report_to="none", use_cpu=True, bf16=False,
                           beta=0.1, loss_type=["sigmoid"], max_length=None,
                           per_device_train_batch_size=args.trl_batch)
    trainer = trl.DPOTrainer(model=model, args=config, processing_class=AutoTokenizer.from_pretrained(model_dir),
                             train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    model = trainer.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def train_step(examples):
        chunks = [examples[i:i + args.trl_batch] for i in range(0, len(examples), args.trl_batch)]
        for chunk in chunks:
            loss = trainer.compute_loss(model, trainer.data_collator(chunk))
            (loss * len(chunk) / len(examples)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(train_step, steps)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    total = args.pairs_per_step * (args.steps + WARMUP_STEPS)
    model_dir, pairs = load_pairs(args.max_length, args.max_prompt_length, total, args.seed)
    steps = [pairs[i:i + args.pairs_per_step] for i in range(0, total, args.pairs_per_step)]
    result = (run_mft if args.worker == "mft" else run_trl)(args, model_dir, steps)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--trl-batch", type=int, default=2, help="TRL's pairs per micro-batch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    # One thread: on shared cores a second intra-op thread waits for its descheduled partner (bench/RESULTS.md,
    # code_eval_speed); pass --threads 2 on an idle machine.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--worker", choices=("mft", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mft_bench_preference"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = {}
    for name in ("trl", "mft"):
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--pairs-per-step",
               str(args.pairs_per_step), "--trl-batch", str(args.trl_batch), "--max-length", str(args.max_length),
               "--max-prompt-length", str(args.max_prompt_length), "--threads", str(args.threads), "--seed",
               str(args.seed)]
        print(f"{name} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        results[name] = json.loads(line[len("RESULT "):])
    mft, base = results["mft"], results["trl"]
    table = "\n".join([
        "| contender | real tok/s | peak RSS MiB | tok/s vs TRL | RSS vs TRL | timed s |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {r['real_tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
          f"{r['real_tokens_per_s'] / base['real_tokens_per_s']:.2f}x | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x "
          f"| {r['seconds']:.1f} |" for name, r in (("trl", base), ("mft", mft))),
    ])
    print(table)
    if not args.no_record:
        record(args, table)


def record(args, table: str) -> None:
    import transformers
    import trl

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    load = os.getloadavg()[0]
    text = (f"\n## {datetime.date.today().isoformat()} preference_vs_trl: DPO tokens/s and peak memory, mft vs TRL "
            f"DPOTrainer (CPU)\n\n`python bench/preference_vs_trl.py --steps {args.steps} --pairs-per-step "
            f"{args.pairs_per_step} --trl-batch {args.trl_batch} --max-length {args.max_length}` on {cpu} "
            f"({os.cpu_count()} cores, {args.threads} threads, load average {load:.1f}); torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}. SmolLM2-135M-Instruct, LoRA r16 "
            f"all-linear, fp32, DPO beta 0.1, reference = adapters off, {args.pairs_per_step} dataframebench pairs per "
            f"step, {args.steps} timed steps after {WARMUP_STEPS} warm-up.\n\n{table}\n")
    with open(BENCH_DIR / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
