"""Importing MFTCoder train configs: ``mft import mftcoder CONFIG.json [-o my.yaml]``.

MFTCoder's ``mftcoder_accelerate`` trains from a JSON file whose keys are the fields of ``MftTrainArgs`` (v0.5,
``pefts/mft_arguments.py``). ``MFTCODER_KEYS`` is the one table of what every key becomes: an mft config key
(copied, or converted by a small function when the meaning shifts, with a YAML comment saying how), or nothing,
with the reason. Keys absent from the JSON take ``MftTrainArgs``' defaults, as MFTCoder does (so a config
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
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = ["MFTCODER_KEYS", "MFTCoderConfigError", "Imported", "read_mftcoder_config", "translate", "to_yaml",
           "import_mftcoder"]

REQUIRED = object()  # no default: MftTrainArgs requires the key, and mft needs its value
_PLACEHOLDER = re.compile(r"^\$\{?[A-Za-z_][A-Za-z0-9_]*\}?$")
LOSS_MODES = {"case1": "token", "case2": "sample", "case3": "task", "case4": "task_sample", "coba": "coba"}
# model_type values MFTCoder loads with its own modelling code (utils/model_mapping.py), not transformers'.
_REMOTE_CODE_TYPES = ("aquila2", "baichuan", "chatglm2", "chatglm3", "qwen", "deepseek_v2")


class MFTCoderConfigError(ValueError):
    """An MFTCoder config that cannot be imported: the message names the file and the key, and what would be right."""


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


# -------------------------------------------------------------------------------------------------- converters
# Each takes (value, all MFTCoder args with defaults) and returns {mft key path: (value, comment)}, or a str: why
# the key has no counterpart here. A comment of "" means the meaning is the same.

Out = "dict[str, tuple[Any, str]] | str"


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, str) and bool(_PLACEHOLDER.match(value))


def _same(target: str, comment: str = "") -> Callable[[Any, dict], Out]:
    return lambda value, args: {target: (value, comment)}


def _dropped(why: str) -> Callable[[Any, dict], Out]:
    return lambda value, args: why


def _split_list(value: Any, key: str) -> list[str]:
    """MFTCoder's list-in-a-string (``"[a,b]"``, cut at commas) or a JSON list, as strings."""
    if isinstance(value, list):
        items = value
    else:
        text = str(value).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        items = [x.strip().strip("'\"") for x in text.split(",")]
    items = [str(x).strip() for x in items if str(x).strip()]
    if not items:
        raise MFTCoderConfigError(f"{key}: {value!r} holds no entries; expected \"[path1,path2,...]\"")
    return items


def _data_paths(value: Any, args: dict) -> Out:
    if _is_placeholder(value):
        return {"data.data_paths": ([value], "")}
    return {"data.data_paths": (_split_list(value, "data_paths"), "one task per entry, as in MFTCoder")}


def _task_weights(value: Any, args: dict) -> Out:
    if value is None:
        return "null: every task weighs 1 (loss.task_weights absent)"
    if args["weighted_loss_mode"] == "coba":
        return "not used with weighted_loss_mode coba: CoBa computes the weights (MFTCoder ignores it there too)"
    try:
        weights = [float(x) for x in _split_list(value, "task_weights")]
    except ValueError:
        raise MFTCoderConfigError(f"task_weights: {value!r} is not a list of numbers; expected \"[1.0,2.0,...]\"") from None
    n = _task_count(args)
    if n is not None and len(weights) != n:
        raise MFTCoderConfigError(f"task_weights: {len(weights)} weights for {n} data_paths; expected one weight per task")
    return {"loss.task_weights": (weights, "one weight per task, in the order of data.data_paths")}


def _task_count(args: dict) -> int | None:
    paths = args["data_paths"]
    return None if _is_placeholder(paths) else len(_split_list(paths, "data_paths"))


def _data_split(value: Any, args: dict) -> Out:
    try:
        parts = [float(x) for x in re.split(r"[,/]", str(value))]
    except ValueError:
        raise MFTCoderConfigError(f"data_split: {value!r} is not a split; expected \"train,valid,test\" percentages such "
                           f"as \"98,2,0\"") from None
    if not 0 < parts[0] <= 100:
        raise MFTCoderConfigError(f"data_split: the train share {parts[0]:g} must be in (0, 100]; e.g. \"98,2,0\"")
    ratio = round(1 - parts[0] / 100, 6)
    return {"data.valid_ratio": (ratio, "MFTCoder trains on ceil(train% of each task) and validates on the rest, "
                                        "its test share included; mft holds out round(ratio x samples), at least 1 "
                                        "per task")}


def _padding_mode(value: Any, args: dict) -> Out:
    if value == "pack":
        return {"data.packing": ("pack", "mft packs best-fit, attention never crosses samples and positions restart "
                                         "per sample; MFTCoder's pack concatenated samples in file order, let each "
                                         "attend to the ones before it in its row, and labelled a row with one task")}
    if value == "padding":
        return {"data.packing": ("padding", "one sample per row, as in MFTCoder")}
    if value == "concat":
        raise MFTCoderConfigError("padding_mode: 'concat' (fixed windows cut across samples, for pretraining) has no "
                           "counterpart in mft; use 'pack' (whole samples, several per row) or 'padding'")
    raise MFTCoderConfigError(f"padding_mode: {value!r}; expected 'padding' or 'pack'")


def _tokenize_mode(value: Any, args: dict) -> Out:
    if value == "sft":
        return "sft is mft's only mode: loss on the assistant turns (and on every token of {\"text\": ...} records)"
    raise MFTCoderConfigError(f"tokenize_mode: {value!r} (loss on every token of every record) has no counterpart in "
                       f"mft; write the records as {{\"text\": ...}} lines, which train every token, and set 'sft'")


def _load_raw_dataset(value: Any, args: dict) -> Out:
    if value:
        return "mft always reads the JSONL and caches its tokenisation"
    raise MFTCoderConfigError("load_raw_dataset: false reads MFTCoder's offline-tokenised binary files, which mft does "
                       "not read; point data_paths at the JSONL task directories and set it to true")


def _loss_mode(value: Any, args: dict) -> Out:
    if value not in LOSS_MODES:
        raise MFTCoderConfigError(f"weighted_loss_mode: {value!r}; expected one of {', '.join(LOSS_MODES)}")
    return {"loss.mode": (LOSS_MODES[value], f"MFTCoder's {value}, computed exactly over the whole optimizer step "
                                             "(all micro-batches, all ranks); MFTCoder averaged it per micro-batch")}


def _coba(name: str) -> Callable[[Any, dict], Out]:
    def convert(value: Any, args: dict) -> Out:
        if args["weighted_loss_mode"] != "coba":
            return "used only with weighted_loss_mode coba"
        comment = ("mft's CoBa: divergence factor capped at 1, slopes over the last coba_history_length updates, "
                   "curves normalised by each task's validation loss before training, as MFTCoder "
                   "(docs/migrating-from-mftcoder.md)"
                   if name == "coba_warmup_steps" else "")
        return {f"loss.{name}": (value, comment)}
    return convert


def _peft_type(value: Any, args: dict) -> Out:
    if value is None:
        return {"model.method": ("full", "full fine-tuning: run with full_finetune_distributed")}
    if value == "lora":
        return {"model.method": ("lora", "MFTCoder's LoraConfig(bias='lora_only') also trained the biases of adapted "
                                         "layers (Qwen2 q/k/v, StarCoder, GPT-NeoX); mft keeps biases frozen")}
    if value == "qlora":
        return {"model.method": ("qlora", "NF4 base (torchao; MFTCoder: bitsandbytes NF4, double quantisation); "
                                          "MFTCoder's LoraConfig(bias='lora_only') also trained the biases of adapted "
                                          "layers, mft keeps them frozen")}
    raise MFTCoderConfigError(f"peft_type: {value!r}; expected 'lora', 'qlora' or null (full fine-tuning)")


def _lora(name: str) -> Callable[[Any, dict], Out]:
    def convert(value: Any, args: dict) -> Out:
        if args["peft_type"] is None:
            return "full fine-tuning (peft_type null) has no adapter"
        return {f"model.lora.{name}": (value, "")}
    return convert


def _target_modules(value: Any, args: dict) -> Out:
    if args["peft_type"] is None:
        return "full fine-tuning (peft_type null) has no adapter"
    if not value:  # MFTCoder tests `if args.target_modules`: null, "" and [] all mean every linear layer
        return {"model.lora.target_modules": ("all-linear", "MFTCoder's default (null): every linear layer")}
    if isinstance(value, str) and value != "all-linear":
        value = _split_list(value, "target_modules") if value.startswith("[") else [value]
    return {"model.lora.target_modules": (value, "")}


def _micro_batch(value: Any, args: dict) -> Out:
    rows = "rows of seq_len packed tokens" if args["padding_mode"] == "pack" else "samples"
    return {"micro_batch_size": (value, f"per rank: {rows}, as in MFTCoder")}


def _tokenizer_type(value: Any, args: dict) -> Out:
    if str(value).lower() != "autotokenizer":
        raise MFTCoderConfigError(f"tokenizer_type: {value!r}; MFTCoder and mft load tokenizers with AutoTokenizer only")
    return "mft loads the tokenizer with AutoTokenizer from tokenizer.path"


def _min_lr(value: Any, args: dict) -> Out:
    return {"lr_scheduler.min_lr": (value, "mft's cosine decays from lr to min_lr; MFTCoder's decayed towards 0 and "
                                           "clamped the lr at min_lr")}


def _scheduler(value: Any, args: dict) -> Out:
    if value == "cosine":
        return "mft's schedule is linear warmup then cosine (lr_scheduler)"
    if value in ("constant", "constant_with_warmup"):
        return {"lr_scheduler.min_lr": (args["learning_rate"], f"MFTCoder's {value}: a cosine that ends at the peak lr")}
    return (f"{value!r} has no counterpart: mft's schedule is linear warmup then cosine down to min_lr; "
            f"imported as that")


def _warmup(value: Any, args: dict) -> Out:
    gas = args["gradient_accumulation_steps"]
    if args["lr_scheduler_type"] == "constant":  # transformers' get_scheduler ignores num_warmup_steps for it
        return {"lr_scheduler.warmup_steps": (0, f"MFTCoder's constant schedule has no warmup (num_warmup_steps "
                                                 f"{value} is ignored by it)")}
    if isinstance(value, float) and value < 1:
        return {"lr_scheduler.warmup_steps": (value, "a fraction of the run's optimizer steps (MFTCoder divided it "
                                                     "by the number of processes and multiplied it by "
                                                     "gradient_accumulation_steps)")}
    steps = int(value) * gas if isinstance(gas, int) else value
    return {"lr_scheduler.warmup_steps": (steps, "optimizer steps: MFTCoder's scheduler warmed up for "
                                                 "num_warmup_steps x gradient_accumulation_steps of them "
                                                 f"({value} x {gas}); its cosine ran over max_train_steps x "
                                                 "gradient_accumulation_steps / processes steps, mft's over the run")}


def _resume_from_checkpoint(value: Any, args: dict) -> Out:
    # Judged on args, not value: a placeholder ("$CKPT") arrives as the default, None, and is a path all the same.
    if args["resume_from_checkpoint"] is not None:
        return ("mft resumes only its own checkpoints (optimizer, data position, RNG); to start from an MFTCoder "
                "adapter merge it (mft export --adapter DIR --base MODEL_DIR --output MERGED) and set "
                "model.model_dir")
    return _auto_resume(args["auto_resume"], args)


def _auto_resume(value: Any, args: dict) -> Out:
    # resume_from_checkpoint and auto_resume decide `resume` together.
    if args["resume_from_checkpoint"] is not None:
        return {"resume": (None, "")}
    auto = bool(args["auto_resume"])
    return {"resume": ("auto" if auto else None, "the newest whole mft checkpoint in output_dir" if auto else "")}


def _early_stopping(value: Any, args: dict) -> Out:
    # early_stopping and early_stopping_stall_num decide `early_stopping_patience` together.
    patience = args["early_stopping_stall_num"] if args["early_stopping"] else None
    return {"early_stopping_patience": (patience, "evaluations without a lower validation loss, MFTCoder's stall "
                                                  "count" if patience else "")}


def _saving_limit(value: Any, args: dict) -> Out:
    if value is None or value < 1:  # MFTCoder: no limit (its trainer tests `if saving_limit`), 2 in full fine-tuning
        if args["peft_type"] is None:
            return {"saving_limit": (2, "MFTCoder keeps 2 checkpoints in full fine-tuning when saving_limit is null "
                                        "or below 1")}
        return {"saving_limit": (None, "keep every checkpoint, as MFTCoder with saving_limit null or 0")}
    return {"saving_limit": (value, "the newest N plus the best, as in MFTCoder")}


def _checkpointing_steps(value: Any, args: dict) -> Out:
    if value < 1:  # MFTCoder's trainer saves by step only `if checkpointing_steps`; mft's key is >= 1 or null
        return {"save_every_n_steps": (None, "MFTCoder's 0: no checkpoints every N steps")}
    return {"save_every_n_steps": (value, "")}


def _attention(value: Any, args: dict) -> Out:
    if value not in ("flash_attention_2", "sdpa", "eager"):
        raise MFTCoderConfigError(f"attn_implementation: {value!r}; expected flash_attention_2, sdpa or eager")
    # MFTCoder's choice is a kernel; mft's auto picks the fastest attention that keeps packed samples apart on the
    # device at hand (MFTCoder's flash_attention_2 on packed rows lets samples attend to each other).
    return {"model.attn_implementation": ("auto", f"MFTCoder: {value}; auto = the fastest exact packed attention "
                                                  "of the device (CUDA: flex_attention, CPU: sdpa_varlen)")}


def _role_markers(value: Any, args: dict) -> Out:
    if value is None:
        return "null: MFTCoder's markers <s>system/human/bot, mft's default (data.template: mft)"
    unknown = set(value) - {"system", "user", "assistant"}
    if unknown or not all(isinstance(v, str) and v for v in value.values()):
        raise MFTCoderConfigError(f"role_markers: {value!r}; expected non-empty strings for system, user and assistant")
    return {"data.role_markers": (dict(value), "")}


def _init_timeout(value: Any, args: dict) -> Out:
    if value is None:
        return "null: mft's distributed_timeout_s keeps its default (600 s)"
    return {"distributed_timeout_s": (value, "MFTCoder's process-group timeout (accelerate's InitProcessGroupKwargs): "
                                             "how long a rank waits in one collective for the others; work one rank "
                                             "does alone (tokenisation cache, checkpoint writes) does not count "
                                             "against it in mft, so mft's default, 600 s, is usually enough")}


def _model_type(value: Any, args: dict) -> Out:
    if value in _REMOTE_CODE_TYPES:
        return (f"mft reads the architecture from config.json; {value!r} runs MFTCoder's own modelling code, which "
                f"mft does not ship: its model directory must carry it, and model.trust_remote_code: true")
    return "mft reads the architecture from the model's config.json"


LEGACY = "legacy in MFTCoder, unused by its accelerate trainer"


@dataclass(frozen=True)
class Key:
    """One ``MftTrainArgs`` field: its default, the JSON types it accepts, and what it becomes."""

    default: Any
    types: tuple[type, ...]
    convert: Callable[[Any, dict], Out]


_STR, _INT, _NUM, _BOOL, _NONE = (str,), (int,), (int, float), (bool,), (type(None),)

# The key table: every MftTrainArgs field of MFTCoder v0.5, in its order.
MFTCODER_KEYS: dict[str, Key] = {
    "data_paths": Key(REQUIRED, _STR + (list,), _data_paths),
    "output_dir": Key(REQUIRED, _STR, _same("output_dir")),
    "tb_dir": Key(None, _STR + _NONE, _dropped("mft writes TensorBoard events to output_dir/tb (tensorboard: true)")),
    "pretrained_model_path": Key(REQUIRED, _STR, _same("model.model_dir", "also the tokenizer's path, as in MFTCoder")),
    "model_type": Key(None, _STR + _NONE, _model_type),
    "load_raw_dataset": Key(True, _BOOL, _load_raw_dataset),
    "task_weights": Key(None, _STR + (list,) + _NONE, _task_weights),
    "data_weights": Key(None, _STR + (list,) + _NONE, _dropped(
        "MFTCoder overwrites it with 1.0 per task and samples tasks in proportion to their sizes: "
        "data.task_sampling: proportional")),
    "low_cpu_mem_usage": Key(True, _BOOL, _dropped(
        "mft builds the model on the meta device and streams the weights into its shards")),
    "data_split": Key("98,2,0", _STR, _data_split),
    "padding_mode": Key("padding", _STR, _padding_mode),
    "tokenize_mode": Key("sft", _STR, _tokenize_mode),
    "weighted_loss_mode": Key("case3", _STR, _loss_mode),
    "peft_type": Key("qlora", _STR + _NONE, _peft_type),
    "quantization": Key("4bit", _STR + _NONE, _dropped(
        "MFTCoder derives it from peft_type (qlora: 4-bit NF4, else none) and ignores the key; 8bit has no "
        "counterpart in either")),
    "lora_rank": Key(96, _INT, _lora("rank")),
    "lora_alpha": Key(32, _NUM, _lora("alpha")),
    "lora_dropout": Key(0.05, _NUM, _lora("dropout")),
    "target_modules": Key(None, _STR + (list,) + _NONE, _target_modules),
    "per_device_train_batch_size": Key(8, _INT, _micro_batch),
    "per_device_eval_batch_size": Key(8, _INT, _same("eval_micro_batch_size")),
    "tokenizer_type": Key("AutoTokenizer", _STR, _tokenizer_type),
    "learning_rate": Key(5e-5, _NUM, _same("optimizer.lr")),
    "min_lr": Key(5e-6, _NUM, _min_lr),
    "weight_decay": Key(0.01, _NUM, _same("optimizer.weight_decay")),
    "gradient_accumulation_steps": Key(1, _INT, _same("gradient_accumulation_steps")),
    "lr_scheduler_type": Key("cosine", _STR, _scheduler),
    "num_warmup_steps": Key(0.05, _NUM, _warmup),
    "num_train_epochs": Key(4, _INT, _same("epochs")),
    "max_train_steps": Key(None, _INT + _NONE, _same("max_steps")),
    "seed": Key(1234, _INT, _same("seed")),
    "seq_length": Key(4096, _INT, _same("data.seq_len", "longer samples are dropped (data.truncation: drop), as in "
                                                        "MFTCoder")),
    "resume_from_checkpoint": Key(None, _STR + _NONE, _resume_from_checkpoint),
    "auto_resume": Key(True, _BOOL, _auto_resume),
    "log_interval": Key(10, _INT, _same("log_every_n_steps")),
    "checkpointing_steps": Key(100, _INT, _checkpointing_steps),
    "evaluation_steps": Key(100, _INT, _same("eval_every_n_steps")),
    "epoch_checkpointing": Key(False, _BOOL, _dropped(
        "mft checkpoints every save_every_n_steps, at each new best evaluation and at the end")),
    "shuffle_before_split": Key(True, _BOOL, _dropped(
        "mft's validation split is a seeded random draw per task (MFTCoder's JSONL loader always shuffles)")),
    "use_random_sampler": Key(True, _BOOL, _dropped(
        "unused by MFTCoder's trainer (its loader always shuffles); mft's sampler shuffles with the seed")),
    "early_stopping": Key(True, _BOOL, _early_stopping),
    "early_stopping_stall_num": Key(5, _INT, _early_stopping),
    "saving_limit": Key(None, _INT + _NONE, _saving_limit),
    "use_dynamic_padding": Key(True, _BOOL, _dropped(
        "mft always pads a micro-batch to its longest row (rounded up to a multiple of 8)")),
    "coba_warmup_steps": Key(100, _INT, _coba("coba_warmup_steps")),
    "coba_history_length": Key(200, _INT, _coba("coba_history_length")),
    "coba_tau": Key(5, _NUM, _coba("coba_tau")),
    "coba_update_interval": Key(1, _INT, _coba("coba_update_interval")),
    "coba_sample_valid_num": Key(1, _INT, _coba("coba_sample_valid_num")),
    "attn_implementation": Key("flash_attention_2", _STR, _attention),
    "role_markers": Key(None, (dict,) + _NONE, _role_markers),
    "distributed_type": Key(None, _STR + _NONE, _dropped(
        "mft shards with FSDP2 under torchrun: mft run RECIPE --config CONFIG --nproc-per-node N")),
    "init_timeout_seconds": Key(3600, _INT + _NONE, _init_timeout),
    "use_xformers": Key(True, _BOOL, _dropped(LEGACY)),
    "trust_remote_code": Key(True, _BOOL, _dropped(
        f"{LEGACY} (its loaders always trust remote code); mft runs a model's own code only with "
        "model.trust_remote_code: true")),
    "weight_by_num_documents": Key(True, _BOOL, _dropped(LEGACY)),
    "make_vocab_size_divisible_by": Key(32, _INT, _dropped(LEGACY)),
    "model_parallel_size": Key(1, _INT, _dropped(LEGACY)),
    "use_slow_tokenizer": Key(False, _BOOL, _dropped(LEGACY)),
    "world_size": Key(8, _INT, _dropped(f"{LEGACY}: the process count comes from the launcher "
                                        "(mft run ... --nproc-per-node N)")),
}

# What MFTCoder's trainer does without a key for it, written into every imported config.
_FIXED: dict[str, tuple[Any, str]] = {
    "dtype": ("bf16", "MFTCoder loads and trains in bf16"),
    "model.activation_checkpointing": (True, "MFTCoder enables gradient checkpointing for every method"),
    "optimizer.betas": ([0.9, 0.999], "MFTCoder's AdamW"),
    "clip_grad_norm": (1.0, "MFTCoder's DeepSpeed config clips at 1.0 (its FSDP config does not clip)"),
    "data.task_sampling": ("proportional", "tasks sampled in proportion to their sizes, as MFTCoder's blend"),
    "data.truncation": ("drop", ""),
    "tensorboard": (True, ""),
}

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
    if "xxpo" in raw:  # MFTCoder's dpo_train_config.json: another trainer, other keys
        raise MFTCoderConfigError(
            f"{path}: xxpo: {raw['xxpo']!r}: a config of MFTCoder's preference-optimisation trainer (xxpo_accelerate.py: "
            "DPO, RPO, ORPO on chosen / rejected answers); mft imports configs of its multi-task fine-tuning "
            "(mft_accelerate.py, e.g. lora_train_config.json) and has no preference training")
    overrides = dict(overrides or {})
    micro = overrides.pop("micro_batch_size", None)
    if micro is not None:  # as mft_accelerate.py: both batch sizes
        overrides.update(per_device_train_batch_size=micro, per_device_eval_batch_size=micro)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    problems = []
    for key in raw:
        if key not in MFTCODER_KEYS:
            close = difflib.get_close_matches(key, MFTCODER_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{path}: {key}: not an MftTrainArgs key (MFTCoder v0.5's mft_accelerate.py would refuse it too){hint}")
    args = {}
    for key, spec in MFTCODER_KEYS.items():
        if key not in raw:
            if spec.default is REQUIRED:
                problems.append(f"{path}: {key}: missing; MftTrainArgs requires it")
            args[key] = spec.default
            continue
        value = raw[key]
        ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
        if not ok and not _is_placeholder(value):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in spec.types)
            problems.append(f"{path}: {key}: expected {expected}, got {value!r}")
        args[key] = value
    if problems:
        raise MFTCoderConfigError("\n".join(problems))
    return args


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
    flat: dict[str, Any] = {}
    result = Imported(config={})
    for key, spec in MFTCODER_KEYS.items():
        value = args[key]
        placeholder = _is_placeholder(value)
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
    for key, (value, comment) in _FIXED.items():
        flat.setdefault(key, value)
        if comment:
            result.comments.setdefault(key, []).append(comment)
    if flat.get("model.method") == "full":
        result.recipe = "full_finetune_distributed"
    # The written order: the layout's sections, then the top-level keys.
    tree: dict = {}
    for section, skeleton in _LAYOUT.items():
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
