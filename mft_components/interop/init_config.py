"""A first config for one's own model and data: ``mft init --model DIR --data PATH... [-o my_run.yaml]``.

The config is a shipped one, chosen by the model's family (``config.json``'s ``model_type``) and ``--method``, with
its comments kept and the values this machine needs written over it:

* a GPU: the shipped defaults (bf16, seq_len 4096, the family's batch sizes), with the model and the tasks filled in;
* a CPU: the sizes that train in seconds a step, as the demo does: ``seq_len`` 512, one row per step, a few
  validation samples per task, no activation checkpointing, and ``dtype`` bf16 only where the CPU computes bf16
  natively (avx512_bf16 / AMX), else fp32.

``seq_len`` never exceeds the model's ``max_position_embeddings``. ``cli.py`` then checks the written file as
``mft validate`` does (model, tokenizer, every record).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from mft_components.config.core import read_yaml
from mft_components.config.registry import builtin_config

__all__ = ["InitError", "machine_kind", "cpu_has_bf16", "shipped_config_for", "init_config", "set_yaml_value",
           "add_arguments", "run"]

# config.json's model_type -> the shipped configs written for that family (others start from llama's).
FAMILY_CONFIGS = {"llama": "llama", "qwen2": "qwen", "qwen3": "qwen", "mistral": "mistral", "starcoder2": "starcoder2"}
CPU_SEQ_LEN = 512
CPU_VALID_SIZE = 4


class InitError(ValueError):
    """What ``mft init`` cannot start from: a missing model directory, an unreadable config.json."""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX): there bf16 trains faster than fp32; elsewhere
    it is emulated and slower (bench/RESULTS.md)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo))
    return bool(flags)


def machine_kind() -> str:
    """``gpu`` when torch sees a CUDA device, else ``cpu``."""
    import torch  # only here: `mft init --help` stays fast

    return "gpu" if torch.cuda.is_available() else "cpu"


def _model_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise InitError(f"--model {model_dir}: no such directory; give a Hugging Face model directory (config.json, "
                        f"*.safetensors, tokenizer files), e.g. one `huggingface-cli download ORG/NAME --local-dir DIR` "
                        f"wrote")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InitError(f"--model {model_dir}: no config.json; it is not a Hugging Face model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InitError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise InitError(f"{path}: expected a JSON object")
    return config


def shipped_config_for(model_type: str | None, method: str) -> str:
    """The name of the shipped config ``mft init`` starts from."""
    if method == "full":
        return "qwen_full"
    family = FAMILY_CONFIGS.get(model_type or "", "llama")
    return f"{family}_{method}" if builtin_config(f"{family}_{method}") else f"{family}_lora"


def init_config(model_dir: str | Path, data_paths: list[str], output_dir: str, method: str = "lora",
                machine: str | None = None) -> tuple[str, list[str]]:
    """The YAML text of a config for ``model_dir`` and ``data_paths`` sized for ``machine`` (``cpu`` / ``gpu``;
    default: this one), and the lines that say what was chosen.

    Raises:
        InitError: the model directory is missing or has no readable config.json.
    """
    model_dir = Path(model_dir).expanduser().resolve()
    model_config = _model_config(model_dir)
    machine = machine or machine_kind()
    base = shipped_config_for(model_config.get("model_type"), method)
    text = builtin_config(base).path.read_text(encoding="utf-8")
    values: dict[str, Any] = {
        "output_dir": output_dir,
        "model.model_dir": str(model_dir),
        "model.method": method,
        "data.data_paths": [str(Path(p).expanduser().resolve()) for p in data_paths],
    }
    comments = {"model.model_dir": "the model `mft init --model` was given",
                "data.data_paths": "one task per entry (a directory of *.jsonl, a .jsonl, .parquet or .json file)"}
    shipped = read_yaml(text)
    seq_len = shipped["data"]["seq_len"]
    notes = [f"started from the shipped config {base} ({model_config.get('model_type', 'unknown')} model, {method})"]
    if machine == "cpu":
        bf16 = cpu_has_bf16()
        seq_len = CPU_SEQ_LEN
        values.update({
            "dtype": "bf16" if bf16 else "fp32",
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "model.activation_checkpointing": False,
            "data.valid_size": CPU_VALID_SIZE,
            "epochs": 1,
        })
        comments.update({
            "dtype": "this CPU computes bf16 natively (avx512_bf16/AMX)" if bf16 else
                     "this CPU has no native bf16 (avx512_bf16/AMX): fp32 is faster here",
            "micro_batch_size": f"a CPU: one row of {CPU_SEQ_LEN} tokens per step, as the demo",
            "data.valid_size": "validation samples per task (evaluating on a CPU is slow)",
            "model.activation_checkpointing": "rows of 512 tokens leave little to save by recomputing",
        })
        notes.append(f"sized for this machine's CPU: dtype {values['dtype']}, seq_len {CPU_SEQ_LEN}, one row a step "
                     f"(on a GPU machine `mft init` keeps the shipped sizes)")
    else:
        notes.append("sized for a GPU: the shipped defaults (bf16, the family's batch sizes)")
    max_positions = model_config.get("max_position_embeddings")
    if isinstance(max_positions, int) and 0 < max_positions < seq_len:
        seq_len = max_positions
        comments["data.seq_len"] = "the model's max_position_embeddings"
        notes.append(f"seq_len {seq_len}: the model's max_position_embeddings")
    values["data.seq_len"] = seq_len
    for key, value in values.items():
        text = set_yaml_value(text, key, value, comments.get(key))
    if machine == "cpu":
        text = _drop_key(text, "data.valid_ratio")
    header = (f"# Written by `mft init` for {model_dir.name}: {notes[0]}, {notes[1].split(':')[0]}.\n"
              f"# Check it with `mft validate --config FILE`, look at the data with `mft data --config FILE --show 2`,\n"
              f"# train with `mft run {'full' if method == 'full' else 'lora'}_finetune_distributed --config FILE`.\n"
              f"# What follows is {base}.yaml's text, its comments included.\n\n")
    return header + _strip_header(text), notes


def _strip_header(text: str) -> str:
    """The shipped config without its leading comment block (it names the shipped model and its run command)."""
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        i += 1
    return "".join(lines[i:])


# ------------------------------------------------------------------------------- editing YAML, comments kept


_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[\w]+):(?P<rest>.*)$")


def _find(lines: list[str], dotted: str) -> tuple[int, int] | None:
    """(first, end) line indexes of a key's line and what belongs to it (deeper-indented lines, comments
    included, and ``- item`` lines at its own indent), or None."""
    path: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        m = _KEY_LINE.match(line)
        if not m:
            continue
        indent = len(m.group("indent"))
        path = [(n, k) for n, k in path if n < indent] + [(indent, m.group("key"))]
        if ".".join(k for _, k in path) == dotted:
            end = i + 1
            while end < len(lines) and lines[end].strip():
                deeper = len(lines[end]) - len(lines[end].lstrip()) > indent
                if not (deeper or lines[end][indent:].startswith("- ")):
                    break
                end += 1
            return i, end
    return None


def _scalar(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) and (not value or value != value.strip() or
                                                           re.search(r"[:#{}\[\],&*!|>'\"%@`]", value)) else (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value))


def set_yaml_value(text: str, dotted: str, value: Any, comment: str | None = None) -> str:
    """``text`` with the value of ``dotted`` (``data.seq_len``) replaced, the other lines and comments unchanged; a
    key the text lacks is added at the end of its section. A list is written as a block of ``- item`` lines."""
    lines = text.splitlines(keepends=True)
    found = _find(lines, dotted)
    parent, _, leaf = dotted.rpartition(".")
    if found is None:
        section = _find(lines, parent) if parent else (len(lines), len(lines))
        if section is None:
            raise KeyError(dotted)
        indent = "  " * parent.count(".") + ("  " if parent else "")
        start = end = section[1]
    else:
        start, end = found
        indent = _KEY_LINE.match(lines[start]).group("indent")
    note = f"# {comment}" if comment else ""
    if isinstance(value, list):
        block = [_commented(f"{indent}{leaf}:", note)] + [f"{indent}  - {_scalar(item)}\n" for item in value]
    else:
        if found is not None and comment is None:  # keep the shipped comment, and its continuation lines
            m = re.search(r"\s(#.*)$", lines[start].rstrip("\n"))
            note, end = (m.group(1) if m else ""), start + 1
        block = [_commented(f"{indent}{leaf}: {_scalar(value)}", note)]
    return "".join(lines[:start] + block + lines[end:])


def _commented(line: str, comment: str) -> str:
    """``line`` with ``comment`` in the column the shipped configs put theirs."""
    return f"{line:<38} {comment}\n" if comment else f"{line}\n"


def _drop_key(text: str, dotted: str) -> str:
    lines = text.splitlines(keepends=True)
    found = _find(lines, dotted)
    return text if found is None else "".join(lines[:found[0]] + lines[found[1]:])


# ------------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mft init``."""
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="a Hugging Face model directory (config.json, *.safetensors, tokenizer files)")
    parser.add_argument("--data", required=True, nargs="+", metavar="PATH",
                        help="one task per path: a directory of *.jsonl files, a .jsonl file, or a Parquet / Arrow / "
                             "JSON dataset (pip install 'mft[datasets]')")
    parser.add_argument("-o", "--output", default="my_run.yaml", help="the config file to write (default my_run.yaml)")
    parser.add_argument("--method", choices=["lora", "qlora", "full"], default="lora",
                        help="lora (default), qlora (an NF4 base: least memory) or full fine-tuning")
    parser.add_argument("--output-dir", default=None,
                        help="where the run writes checkpoints (default outputs/NAME, NAME the config's file name)")
    parser.add_argument("--machine", choices=["cpu", "gpu"], default=None,
                        help="size the config for a CPU or a GPU machine (default: this machine)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output file")


def run(args: argparse.Namespace) -> int:
    """Write the config; 0 when written, 1 on an error (a message naming what was wrong, no traceback)."""
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"mft init: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    try:
        text, notes = init_config(args.model, args.data, args.output_dir or f"outputs/{out.stem}", args.method,
                                  args.machine)
    except InitError as e:
        print(f"mft init: error: {e}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"mft init: wrote {out}")
    for note in notes:
        print(f"  {note}")
    return 0
