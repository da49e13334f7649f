"""The command line of `mft eval`, in a module that imports no torch: `mft eval --help` answers at once
(``evaluate.py`` runs the command)."""

from __future__ import annotations

import argparse

from mft_components.assets.dataframebench import DATAFRAMEBENCH_TASKS
from mft_components.code_eval.options import CodeEvalOptions
from mft_components.code_eval.sandbox import ISOLATIONS

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mft eval``."""
    parser.add_argument("--model", required=True,
                        help="an exported directory, a checkpoint (output_dir/step_N) or a base model directory")
    parser.add_argument("--suite", required=True,
                        help="dataframebench, humaneval, or an eval JSONL file (README: Code evaluation)")
    parser.add_argument("--task", action="append", default=None,
                        help=f"dataframebench: which tasks (default all: {', '.join(DATAFRAMEBENCH_TASKS)}); "
                             "a file: the task's name (default the file's stem)")
    parser.add_argument("--output", default="mft_eval.jsonl", help="JSONL of every answer with its verdict")
    parser.add_argument("--template", choices=["mft", "hf"], default=None,
                        help="chat format for a model without a training one (a base model): mft markers or the "
                             "tokenizer's chat_template")
    defaults = CodeEvalOptions()
    for name, kind in (("num_samples", int), ("k", int), ("temperature", float), ("top_p", float),
                       ("max_new_tokens", int), ("batch_size", int), ("cpu_threads", int), ("max_problems", int),
                       ("timeout_s", float),
                       ("memory_mb", int), ("max_processes", int), ("workers", int), ("python", str), ("seed", int)):
        flag = "--" + name.replace("_", "-")
        if name == "k":
            parser.add_argument(flag, type=int, action="append", default=None, help="pass@k to report (repeatable)")
        else:
            parser.add_argument(flag, type=kind, default=getattr(defaults, name), help=f"default {getattr(defaults, name)}")
    parser.add_argument("--isolation", choices=ISOLATIONS, default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped with the model (off: such a model is "
                             "refused, never asked about)")


