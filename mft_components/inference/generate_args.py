"""The command line of `mft generate`, in a module that imports no torch: `mft generate --help` answers at once
(``generate.py`` runs the command)."""

from __future__ import annotations

import argparse

from mft_components.inference.export_args import OUTPUT_DTYPE_NAMES

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mft generate`."""
    parser.add_argument("--model", required=True, help="an exported directory, or the base model with --adapter")
    parser.add_argument("--adapter", default=None, help="a LoRA/QLoRA checkpoint (output_dir/step_N) or OUT/adapter")
    parser.add_argument("--template", choices=["mft", "mftcoder_atorch", "hf"], default=None,
                        help="chat format where the model and adapter carry no training one (a base model, an "
                             "MFTCoder adapter): mft (MFTCoder's markers), mftcoder_atorch, or hf (the tokenizer's "
                             "chat_template)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user prompt")
    src.add_argument("--file", help="JSONL of {'prompt': ...} or {'messages': [...]}; writes JSONL answers")
    parser.add_argument("--output", default=None, help="with --file: write the answers here (default stdout)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument("--greedy", action="store_true", help="argmax decoding")
    decoding.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--dtype", default="fp32", choices=list(OUTPUT_DTYPE_NAMES))
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped with the model (off: such a model is "
                             "refused, never asked about)")


