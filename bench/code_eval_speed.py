"""Seconds per code evaluation (generation + sandboxed execution) for the demo's model and eval sets.

    python bench/code_eval_speed.py                      # SmolLM2-135M LoRA r16 (in-training form), demo eval sets
    python bench/code_eval_speed.py --threads 1 --repeats 2
    python bench/code_eval_speed.py --model-dir DIR --suite dataframebench:pandas_solution --max-problems 100 \\
        --device cuda --dtype bf16 --batch-size 32 --max-new-tokens 512      # e.g. a 3B model on a GPU

The model is built as the recipe builds it (``build_model``: LoRA on the attention and MLP projections, the
training attention ``sdpa_varlen``, which generation swaps for ``sdpa``), and evaluated by ``evaluate_code``,
what the recipe calls at each code evaluation: greedy answers, code extraction, execution in the sandbox
(bubblewrap where it works). Printed per repeat: wall seconds, of which generation and execution, answer tokens per
second, and the CPU seconds of this process and of the sandboxed programs (less sensitive than wall time to other
jobs on a shared machine), with the load average.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="default: the demo's SmolLM2-135M-Instruct")
    parser.add_argument("--suite", action="append", default=None,
                        help="task sources (default: the demo's eval files, pandas_solution and polars_solution)")
    parser.add_argument("--max-problems", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from mft_components.code_eval.evaluate import CodeEvalOptions, evaluate_code, load_tasks, make_sandbox
    from mft_components.code_eval.suites import DEMO_EVAL_TASKS, prepare_dataframebench_eval
    from mft_components.demo_assets import prepare_smollm2
    from mft_components.models import build_model
    from mft_components.templates import ChatFormat

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or str(prepare_smollm2())
    if args.suite:
        tasks = {s.split(":")[-1].replace(".jsonl", "").split("/")[-1]: s for s in args.suite}
    else:
        root = prepare_dataframebench_eval()
        tasks = {t: str(root / f"{t}.jsonl") for t in DEMO_EVAL_TASKS}
    options = CodeEvalOptions(tasks=tasks, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              max_problems=args.max_problems, timeout_s=30)
    problems = load_tasks(options.tasks, options.max_problems)
    sandbox = make_sandbox(options)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = build_model(model_dir, method="lora", lora={"rank": 16, "alpha": 32}, dtype=args.dtype,
                        attn_implementation="sdpa_varlen" if args.device == "cpu" else "sdpa", device=args.device)
    print(f"model {model_dir} ({args.dtype}, {args.device}, {torch.get_num_threads()} threads); "
          f"{sum(map(len, problems.values()))} problems; isolation: {sandbox.isolation}")
    for repeat in range(args.repeats):
        cpu0, child0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        result = evaluate_code(model, tokenizer, ChatFormat(), problems, options, sandbox)
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        m = result.metrics
        tokens = sum(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in result.records)
        print(f"repeat {repeat}: {m['seconds']:.1f} s per evaluation (generation {m['generate_s']:.1f} s, "
              f"{tokens / m['generate_s']:.1f} answer tokens/s for {tokens} tokens; execution {m['execute_s']:.1f} s); "
              f"CPU s: this process {time.process_time() - cpu0:.1f}, programs "
              f"{child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime:.1f}; "
              f"pass@1 {m['pass@1']:.3f}; load average {os.getloadavg()[0]:.1f}")
    sandbox.close()


if __name__ == "__main__":
    main()
