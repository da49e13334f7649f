"""The command line of `mft eval` and `mft pairs`, in a module that imports no torch: `mft eval --help` answers at
once (``evaluate.py`` and ``pairs.py`` run the commands)."""

from __future__ import annotations

import argparse

from mft_components.assets.dataframebench import DATAFRAMEBENCH_TASKS
from mft_components.code_eval.options import CodeEvalOptions
from mft_components.code_eval.sandbox import ISOLATIONS

__all__ = ["OPTION_FLAGS", "add_model_arguments", "add_option_arguments", "options_from_arguments", "add_arguments"]


# Options of eval.code that `mft eval` and `mft pairs` take as flags (--num-samples ...), with their types.
OPTION_FLAGS = {"num_samples": int, "k": int, "temperature": float, "top_p": float, "max_new_tokens": int,
                "batch_size": int, "cpu_threads": int, "max_problems": int, "timeout_s": float, "memory_mb": int,
                "max_processes": int, "workers": int, "python": str, "isolation": str, "seed": int}


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The model and suite arguments ``mft eval`` and ``mft pairs`` share (``mft eval --check-suite`` needs
    neither: ``required`` False)."""
    parser.add_argument("--model", required=required,
                        help="an exported directory, a checkpoint (output_dir/step_N) or a base model directory")
    parser.add_argument("--suite", required=required,
                        help="dataframebench, humaneval, or an eval JSONL file (README: Code evaluation)")
    parser.add_argument("--task", action="append", default=None,
                        help=f"dataframebench: which tasks (default all: {', '.join(DATAFRAMEBENCH_TASKS)}); "
                             "a file: the task's name (default the file's stem)")
    parser.add_argument("--template", choices=["mft", "hf"], default=None,
                        help="chat format for a model without a training one (a base model): mft markers or the "
                             "tokenizer's chat_template")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped with the model (off: such a model is "
                             "refused, never asked about)")


def add_option_arguments(parser: argparse.ArgumentParser, names=tuple(OPTION_FLAGS), **defaults) -> None:
    """Flags for the ``eval.code`` options ``names`` (``--num-samples``, ...); ``defaults`` replace the options'."""
    base = CodeEvalOptions()
    for name in names:
        flag, default = "--" + name.replace("_", "-"), defaults.get(name, getattr(base, name))
        if name == "k":
            parser.add_argument(flag, type=int, action="append", default=None, help="pass@k to report (repeatable)")
        elif name == "isolation":
            parser.add_argument(flag, choices=ISOLATIONS, default=default)
        else:
            parser.add_argument(flag, type=OPTION_FLAGS[name], default=default, help=f"default {default}")


def options_from_arguments(args: argparse.Namespace, tasks: dict[str, str], names=tuple(OPTION_FLAGS),
                           **fixed) -> CodeEvalOptions:
    """``CodeEvalOptions`` from the flags ``names`` (and ``fixed`` values).

    Raises:
        CodeEvalError: ``eval.code.KEY: problem`` for a value a run would refuse too.
    """
    return CodeEvalOptions.from_config({"tasks": tasks, **{k: getattr(args, k) for k in names}, **fixed})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mft eval``."""
    add_model_arguments(parser, required=False)
    parser.add_argument("--check-suite", metavar="SUITE", default=None,
                        help="instead of a model: run every canonical solution of humaneval or dataframebench[:TASK] "
                             "and name the problems that do not pass here (missing module, failed test, timeout)")
    parser.add_argument("--output", default="mft_eval.jsonl", help="JSONL of every answer with its verdict")
    add_option_arguments(parser)
