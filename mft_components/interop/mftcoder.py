"""Importing MFTCoder train configs: ``mft import mftcoder CONFIG.json [-o my.yaml]``.

MFTCoder's ``mftcoder_accelerate`` trains from a JSON file whose keys are the fields of ``MftTrainArgs`` (v0.5,
``pefts/mft_arguments.py``; multi-task SFT, recipe ``lora_finetune_distributed`` / ``full_finetune_distributed``)
or, with an ``xxpo`` key, of ``XXPOTrainArgs`` (its preference trainer, ``dpo_train_config.json``; recipe
``preference_finetune_distributed``, table ``XXPO_KEYS`` in ``mftcoder_dpo_keys.py``). ``MFTCODER_KEYS``
(``mftcoder_keys.py``) is the one table of what every SFT key becomes:
an mft config key (copied, or converted by a small function when the meaning shifts, with a YAML comment saying
how), or nothing, with the reason. Keys absent from the JSON take ``MftTrainArgs``' defaults, as MFTCoder does (so a config
without ``peft_type`` is QLoRA there and here). Values MFTCoder's shipped examples leave as placeholders
(``"$DATA_PATHS"``) are written as they are, marked, and reported as values to fill in.

    mftcoder JSON --read_mftcoder_config--> keys with MftTrainArgs' defaults (unknown keys, bad types: errors)
                  --translate--> Imported(config, comments, dropped, fill_in)  --to_yaml--> commented mft YAML

What mft computes differently (exact step loss, packing without cross-sample attention, CoBa's choices) is
explained in docs/migrating-from-mftcoder.md.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mft_components.interop.mftcoder_dpo_keys import XXPO_FIXED, XXPO_KEYS, XXPO_RECIPE
from mft_components.interop.mftcoder_keys import (
    FIXED,
    MFTCODER_KEYS,
    V04_DROPPED,
    V04_NOTES,
    V04_RENAMED,
    REQUIRED,
    MFTCoderConfigError,
    is_placeholder,
)

__all__ = ["MFTCODER_KEYS", "MFTCoderConfigError", "Imported", "read_mftcoder_config", "translate", "to_yaml",
           "import_mftcoder"]

@dataclass
class Imported:
    """The result of ``translate``.

    Attributes:
        config: the mft config (nested dicts, in the order it is written).
        comments: mft key path -> comment lines written above it (where the meaning shifts).
        sources: mft key path -> the MFTCoder key(s) it comes from (written beside it).
        dropped: (MFTCoder key, why it has no counterpart).
        fill_in: (MFTCoder key, mft key path, placeholder) of values left to fill in.
        recipe: the mft recipe that runs the config.
    """

    config: dict
    comments: dict[str, list[str]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    fill_in: list[tuple[str, str, str]] = field(default_factory=list)
    recipe: str = "lora_finetune_distributed"



# The layout of the written config: sections and keys in this order (keys absent from a translation are skipped).
_LAYOUT = {
    "output_dir": None,
    "model": {"_component_": "mft_components.models.build_model"},
    "tokenizer": {"_component_": "mft_components.models.load_tokenizer", "path": "${model.model_dir}"},
    "data": {"_component_": "mft_components.data.build_mft_data"},
    "loss": {"_component_": "mft_components.loss.TaskWeightedLoss"},
    "optimizer": {"_component_": "torch.optim.AdamW"},
    "lr_scheduler": {"_component_": "mft_components.training.lr_schedule.cosine_with_warmup"},
}
_TOP_LEVEL_ORDER = ("seed", "dtype", "epochs", "max_steps", "micro_batch_size", "eval_micro_batch_size",
                    "gradient_accumulation_steps", "clip_grad_norm", "eval_every_n_steps", "early_stopping_patience",
                    "save_every_n_steps", "saving_limit", "resume", "log_every_n_steps", "tensorboard",
                    "distributed_timeout_s")
# A preference config: the pairs' data builder and the preference loss, and where the reference log-probs come from.
_XXPO_LAYOUT = {
    **_LAYOUT,
    "data": {"_component_": "mft_components.data.preference.build_preference_data"},
    "loss": {"_component_": "mft_components.loss.preference.PreferenceLoss"},
    "reference": None,
}


@dataclass(frozen=True)
class Trainer:
    """One of MFTCoder's trainers: its arguments class, key table, what it does without a key, and the layout."""

    script: str
    args_class: str
    keys: dict
    fixed: dict
    layout: dict


SFT = Trainer("mft_accelerate.py", "MftTrainArgs", MFTCODER_KEYS, FIXED, _LAYOUT)
XXPO = Trainer("xxpo_accelerate.py", "XXPOTrainArgs", XXPO_KEYS, XXPO_FIXED, _XXPO_LAYOUT)


def trainer_of(args: dict) -> Trainer:
    """The trainer a config is for: a config with ``xxpo`` is the preference trainer's (``dpo_train_config.json``)."""
    return XXPO if "xxpo" in args else SFT


# ------------------------------------------------------------------------------------------------------ reading


def read_mftcoder_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict:
    """Read an MFTCoder train config and fill ``MftTrainArgs``' defaults.

    Args:
        path: the JSON file.
        overrides: values that replace the file's (``mft_accelerate.py``'s own command-line overrides:
            data_paths, output_dir, tb_dir, pretrained_model_path, model_type, micro_batch_size).

    Returns:
        Every key of ``MFTCODER_KEYS`` with its value.

    Raises:
        MFTCoderConfigError: a missing or invalid file, an unknown key (with the closest known one), a missing required
            key, or a value of the wrong type; each names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise MFTCoderConfigError(f"{path}: no such file (expected an MFTCoder train config, e.g. lora_train_config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MFTCoderConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise MFTCoderConfigError(f"{path}: expected a JSON object of MftTrainArgs keys, got {type(raw).__name__}")
    trainer = trainer_of(raw)
    overrides = dict(overrides or {})
    micro = overrides.pop("micro_batch_size", None)
    if micro is not None:  # as mft_accelerate.py: both batch sizes
        overrides.update(per_device_train_batch_size=micro, per_device_eval_batch_size=micro)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    problems = []
    v04_notes = _rename_v04_keys(raw, path, problems)
    for key in raw:
        if key not in trainer.keys:
            close = difflib.get_close_matches(key, trainer.keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{path}: {key}: not an {trainer.args_class} key (MFTCoder v0.5's {trainer.script} would "
                            f"refuse it too){hint}")
    args = {}
    for key, spec in trainer.keys.items():
        if key not in raw:
            if spec.default is REQUIRED:
                problems.append(f"{path}: {key}: missing; {trainer.args_class} requires it")
            args[key] = spec.default
            continue
        value = raw[key]
        ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
        if not ok and not is_placeholder(value):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in spec.types)
            problems.append(f"{path}: {key}: expected {expected}, got {value!r}")
        args[key] = value
    if problems:
        raise MFTCoderConfigError("\n".join(problems))
    args[V04_NOTES] = v04_notes
    return args


def _rename_v04_keys(raw: dict, path: Path, problems: list[str]) -> list[tuple[str, str]]:
    """MFTCoder v0.4's self-paced keys (``weighted_loss_mode: selfpaced``) under their v0.5 CoBa names, in place.

    Returns:
        (v0.4 key, what it became) for the import's report.
    """
    notes = []
    for old, new in V04_RENAMED.items():
        if old not in raw:
            continue
        if new in raw:
            problems.append(f"{path}: {old}: v0.4's name of {new}, which the file sets too; keep one")
            continue
        raw[new] = raw.pop(old)
        notes.append((old, f"MFTCoder v0.4's name of {new}: written as loss.{new}"))
    for old, why in V04_DROPPED.items():
        if old in raw:
            raw.pop(old)
            notes.append((old, why))
    if raw.get("weighted_loss_mode") == "selfpaced":
        raw["weighted_loss_mode"] = "coba"
        notes.append(("weighted_loss_mode", "selfpaced: MFTCoder v0.4's self-paced loss, which v0.5 replaced by "
                                            "CoBa: written as loss.mode: coba (CoBa starts weighing after "
                                            "loss.coba_warmup_steps; v0.4 weighed from the first step)"))
    return notes


# -------------------------------------------------------------------------------------------------- translating


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def translate(args: dict) -> Imported:
    """Translate MFTCoder args (``read_mftcoder_config``) into an mft config.

    Raises:
        MFTCoderConfigError: a value mft cannot reproduce (e.g. ``padding_mode: concat``), naming the key.
    """
    trainer = trainer_of(args)
    flat: dict[str, Any] = {}
    result = Imported(config={})
    for key, spec in trainer.keys.items():
        value = args[key]
        placeholder = is_placeholder(value)
        # A placeholder goes where a real value would: convert the default to find the place.
        probe = spec.default if placeholder and spec.default is not REQUIRED else value
        out = spec.convert(probe, args)
        if isinstance(out, str):
            result.dropped.append((key, out))
            continue
        for target, (new, comment) in out.items():
            flat[target] = value if placeholder and target != "data.data_paths" else new
            if target not in result.sources:
                result.sources[target] = key
            elif key not in result.sources[target]:
                result.sources[target] += f", {key}"
            if comment and comment not in result.comments.get(target, []):
                result.comments.setdefault(target, []).append(comment)
            if placeholder:
                result.fill_in.append((key, target, value))
    result.dropped += args.get(V04_NOTES, [])
    for key, (value, comment) in trainer.fixed.items():
        flat.setdefault(key, value)
        if comment:
            result.comments.setdefault(key, []).append(comment)
    if trainer is XXPO:
        result.recipe = XXPO_RECIPE
    elif flat.get("model.method") == "full":
        result.recipe = "full_finetune_distributed"
    # The written order: the layout's sections, then the top-level keys.
    tree: dict = {}
    for section, skeleton in trainer.layout.items():
        if skeleton is None:
            if section in flat:
                tree[section] = flat[section]
            continue
        tree[section] = dict(skeleton)
        for dotted in [k for k in flat if k.startswith(section + ".")]:
            _set(tree, dotted, flat[dotted])
    for key in _TOP_LEVEL_ORDER:
        if key in flat:
            tree[key] = flat[key]
    result.config = tree
    return result


# ------------------------------------------------------------------------------------------------------ writing


def _scalar(value: Any) -> str:
    """A YAML value on one line (flow style for lists and dicts; PyYAML quotes only what needs quoting)."""
    if isinstance(value, str) and value.startswith("${"):
        return value  # an interpolation, written as is
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, allow_unicode=True, width=math.inf)
    return text.removesuffix("\n...\n").rstrip("\n")


def _wrap(text: str, first: str, rest: str, width: int = 116) -> list[str]:
    """``text`` as comment lines of at most ``width`` characters: ``first`` starts the first, ``rest`` the others."""
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                         break_on_hyphens=False)


def to_yaml(result: Imported, source: str) -> str:
    """The config as commented YAML: a header with what to fill in and what has no counterpart, then each key
    with the MFTCoder key it comes from beside it and, above it, how its meaning shifts."""
    fill = {target for _, target, _ in result.fill_in}
    head = [f"# Imported from the MFTCoder config {source} by `mft import mftcoder`.",
            f"#   check: mft validate --config THIS.yaml --recipe {result.recipe}",
            f"#   run:   mft run {result.recipe} --config THIS.yaml [--nproc-per-node N]",
            "# Beside each key: the MFTCoder key it comes from. What mft computes exactly where MFTCoder approximates",
            "# (per-micro-batch loss averaging, packing across samples and tasks, CoBa): docs/migrating-from-mftcoder.md"]
    if result.fill_in:
        head += ["#", "# TO FILL IN (placeholders in the MFTCoder config):"]
        head += [f"#   {target}: {placeholder}  (MFTCoder's {key})" for key, target, placeholder in result.fill_in]
    head += ["#", "# MFTCoder keys not written here, and why:"]
    for key, why in result.dropped:
        head += _wrap(f"{key}: {why}", "#   - ", "#     ")
    lines = head + [""]

    def emit(node: dict, prefix: str, indent: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            for comment in result.comments.get(dotted, []):
                lines.extend(_wrap(comment, f"{indent}# ", f"{indent}# "))
            if isinstance(value, dict) and key != "role_markers":
                lines.append(f"{indent}{key}:")
                emit(value, dotted + ".", indent + "  ")
                if not prefix:
                    lines.append("")
                continue
            beside = []
            if dotted in result.sources:
                beside.append(result.sources[dotted])
            if dotted in fill:
                beside.append("<- FILL IN")
            lines.append(f"{indent}{key}: {_scalar(value)}" + (f"  # {'; '.join(beside)}" if beside else ""))

    emit(result.config, "", "")
    return "\n".join(lines).rstrip("\n") + "\n"


def report(result: Imported, written_to: str) -> str:
    """What the person running the import reads: where the config went, what to fill in, what was left out."""
    out = [f"wrote {written_to} (recipe {result.recipe})"]
    if result.fill_in:
        out.append(f"{len(result.fill_in)} value(s) to fill in (MFTCoder placeholders):")
        out += [f"  {target}: {placeholder}  (from {key})" for key, target, placeholder in result.fill_in]
    out.append(f"{len(result.dropped)} MFTCoder key(s) not written, and why:")
    out += [f"  {key}: {why}" for key, why in result.dropped]
    targets = result.comments.get("model.lora.target_modules")
    if targets:  # what the adapter covers (MoE experts and router) is worth reading before a long run
        out.append("model.lora.target_modules: " + " ".join(targets))
    out.append(f"check it: mft validate --config {written_to} --recipe {result.recipe}")
    return "\n".join(out)


def import_mftcoder(config_json: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Imported, str]:
    """Read, translate and render an MFTCoder config: ``(Imported, YAML text)``.

    Raises:
        MFTCoderConfigError: see ``read_mftcoder_config`` and ``translate``; messages name the file and the key.
    """
    args = read_mftcoder_config(config_json, overrides)
    try:
        result = translate(args)
    except MFTCoderConfigError as e:
        raise MFTCoderConfigError(f"{config_json}: {e}") from None
    return result, to_yaml(result, Path(config_json).name)


# ---------------------------------------------------------------------------------------------------------- CLI

# mft_accelerate.py's command-line overrides of the JSON, accepted here too.
_CLI_OVERRIDES = {"data_paths": str, "output_dir": str, "tb_dir": str, "pretrained_model_path": str,
                  "model_type": str, "micro_batch_size": int}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``mft import``."""
    parser.add_argument("source", choices=["mftcoder"], help="the format to import from")
    parser.add_argument("config", help="an MFTCoder train config (configs/*_train_config.json)")
    parser.add_argument("-o", "--output", help="YAML file to write (default: print it)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output file")
    for name, kind in _CLI_OVERRIDES.items():
        what = "per_device_train/eval_batch_size" if name == "micro_batch_size" else name
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help=f"replaces the config's {what}, as the same flag of MFTCoder's mft_accelerate.py")


def run(args: argparse.Namespace) -> int:
    """``mft import mftcoder CONFIG.json [-o my.yaml]``: 0 when written, 1 on an error (a message, no traceback)."""
    overrides = {name: getattr(args, name) for name in _CLI_OVERRIDES}
    try:
        result, text = import_mftcoder(args.config, overrides)
    except MFTCoderConfigError as e:
        print(f"mft import: error: {e}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(text)
        print(report(result, "the config to stdout"), file=sys.stderr)
        return 0
    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"mft import: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(report(result, str(out)))
    return 0
