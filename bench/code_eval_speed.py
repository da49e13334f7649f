"""Seconds per code evaluation (generation + sandboxed execution) for the demo's model and eval sets.

    python bench/code_eval_speed.py                      # SmolLM2-135M LoRA r16 (in-training form), demo eval sets
    python bench/code_eval_speed.py --cpu-threads 1 2 --repeats 2
    python bench/code_eval_speed.py --model-dir DIR --suite dataframebench:pandas_solution --max-problems 100 \\
        --device cuda --dtype bf16 --batch-size 32 --max-new-tokens 512      # e.g. a 3B model on a GPU

The model is built as the recipe builds it (``build_model``: LoRA on the attention and MLP projections, the
training attention ``sdpa_varlen``, which generation swaps for ``sdpa``), and evaluated by ``evaluate_code``,
what the recipe calls at each code evaluation: greedy answers, code extraction, execution in the sandbox
(bubblewrap where it works). Printed per repeat: wall seconds, of which generation and execution, answer tokens per
second, the CPU seconds of this process and the load average, for each
``cpu_threads`` (torch's intra-op threads while generating on a CPU; by default 1 against torch's own setting).
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--cpu-threads", type=int, nargs="+", default=[1, 0],
                        help="intra-op threads while generating on a CPU, one evaluation each (0: torch's setting, "
                             "%(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from mft_components.code_eval.evaluate import evaluate_code, load_tasks, make_sandbox
    from mft_components.code_eval.options import CodeEvalOptions
    from mft_components.code_eval.suites import DEMO_EVAL_TASKS, prepare_dataframebench_eval
    from mft_components.assets import prepare_smollm2
    from mft_components.models import build_model
    from mft_components.data.templates import ChatFormat

    model_dir = args.model_dir or str(prepare_smollm2())
    if args.suite:
        tasks = {s.split(":")[-1].replace(".jsonl", "").split("/")[-1]: s for s in args.suite}
    else:
        root = prepare_dataframebench_eval()
        tasks = {t: str(root / f"{t}.jsonl") for t in DEMO_EVAL_TASKS}
    options = CodeEvalOptions(tasks=tasks, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              max_problems=args.max_problems, timeout_s=30)
    problems = load_tasks(options)
    torch_threads = torch.get_num_threads()
    sandbox = make_sandbox(options)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = build_model(model_dir, method="lora", lora={"rank": 16, "alpha": 32}, dtype=args.dtype,
                        attn_implementation="sdpa_varlen" if args.device == "cpu" else "sdpa", device=args.device)
    print(f"model {model_dir} ({args.dtype}, {args.device}, torch's {torch_threads} threads); "
          f"{sum(map(len, problems.values()))} problems; isolation: {sandbox.isolation}")
    for repeat, threads in [(r, t) for r in range(args.repeats) for t in args.cpu_threads]:
        options.cpu_threads = threads or None
        cpu0 = time.process_time()
        result = evaluate_code(model, tokenizer, ChatFormat(), problems, options, sandbox)
        m = result.metrics
        tokens = sum(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in result.records)
        print(f"repeat {repeat}, cpu_threads {threads or torch_threads}: {m['seconds']:.1f} s per evaluation (generation {m['generate_s']:.1f} s, "
              f"{tokens / m['generate_s']:.1f} answer tokens/s for {tokens} tokens; execution {m['execute_s']:.1f} s); "
              f"CPU s of this process {time.process_time() - cpu0:.1f}; "
              f"pass@1 {m['pass@1']:.3f}; load average {os.getloadavg()[0]:.1f}")
    sandbox.close()


if __name__ == "__main__":
    main()
