"""Peak memory of loss + backward: chunked cross entropy (mft_components.loss) against full logits.

    python bench/loss_memory.py                          # vocab 152,064 (Qwen2), 16,384 tokens, hidden 896, bf16
    python bench/loss_memory.py --tokens 4096 --variants naive chunked

Each variant runs in its own subprocess so that peaks do not mix:
- naive:   logits = hidden @ weight.T (bf16, [N, V]), F.cross_entropy(logits.float(), labels), backward
           (what a Hugging Face model's forward + loss does);
- chunked: chunked_cross_entropy(hidden, weight, labels, chunk_size).sum(), backward.
Both get gradients for hidden and weight (full fine-tuning; LoRA needs only hidden's).

Memory is the growth of the peak over the inputs already allocated: on CPU the process's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, exact, no sampling), on CUDA ``torch.cuda.max_memory_allocated``.
Every token carries a loss (the worst case for the chunked loss, which drops the others before projecting).
On CPU, a naive run whose estimated peak (~16 bytes per logit) does not fit in the available memory is skipped
and reported as such; run it at fewer tokens to get the ratio (naive memory is linear in the tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

NAIVE_BYTES_PER_LOGIT = 16  # bf16 logits + fp32 copy + saved log-softmax + fp32 grad (+ bf16 grad), measured ~14


def run_variant(variant: str, tokens: int, vocab: int, hidden: int, chunk_size: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from mft_components.loss import chunked_cross_entropy

    torch.manual_seed(0)
    dev = torch.device(device)
    # Created directly in bf16: a float32 temporary would raise the peak RSS before the baseline is taken.
    h = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16).mul_(0.5).requires_grad_()
    w = torch.randn(vocab, hidden, device=dev, dtype=torch.bfloat16).mul_(0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=dev)

    def loss_and_backward():
        if variant == "naive":
            logits = h @ w.t()
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        else:
            loss = chunked_cross_entropy(h, w, labels, chunk_size=chunk_size).sum()
        loss.backward()
        return float(loss)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = loss_and_backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        loss = loss_and_backward()
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "tokens": tokens, "peak_bytes": peak, "seconds": seconds, "loss": loss / tokens}


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=152_064)
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--variants", nargs="+", default=["naive", "chunked"], choices=["naive", "chunked"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the subprocesses")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args._child, args.tokens, args.vocab, args.hidden, args.chunk_size, args.device)))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"loss + backward, vocab {args.vocab:,}, {args.tokens:,} tokens, hidden {args.hidden}, bf16 inputs, "
        f"chunk {args.chunk_size}, device {device}, torch {torch.__version__}"
    )
    results = {}
    for variant in args.variants:
        estimate = NAIVE_BYTES_PER_LOGIT * args.tokens * args.vocab
        if variant == "naive" and device == "cpu" and estimate > 0.9 * available_bytes():
            print(
                f"  naive  : skipped, needs ~{estimate / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB "
                f"available (use --tokens {int(0.9 * available_bytes() / (NAIVE_BYTES_PER_LOGIT * args.vocab))} "
                "or fewer)"
            )
            continue
        cmd = [sys.executable, __file__, "--_child", variant, "--device", device]
        for key in ("vocab", "tokens", "hidden", "chunk_size", "threads"):
            value = getattr(args, key)
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"  {variant:7s}: failed (rc {proc.returncode}, killed for memory when -9)\n{proc.stderr[-2000:]}")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results[variant] = res
        print(
            f"  {variant:7s}: peak +{res['peak_bytes'] / 2**30:7.2f} GiB over the inputs, "
            f"{res['seconds']:7.1f} s, mean loss {res['loss']:.4f}"
        )
    if "naive" in results and "chunked" in results and results["naive"]["peak_bytes"] > 0:
        ratio = results["chunked"]["peak_bytes"] / results["naive"]["peak_bytes"]
        print(f"  chunked / naive = {ratio:.3f}  (target <= 0.25: {'met' if ratio <= 0.25 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
