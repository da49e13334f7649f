"""The one table of MFTCoder's train-config keys (``MftTrainArgs``, v0.5 ``pefts/mft_arguments.py``) and what each
becomes in mft: ``MFTCODER_KEYS``, key -> ``Key(default, JSON types, converter)``.

A converter takes ``(value, all MFTCoder args with defaults)`` and returns ``{mft key path: (value, comment)}``
(the comment is written above the key where the meaning shifts; "" when it is the same), or a str: why the key has
no counterpart here. ``FIXED`` is what MFTCoder's trainer does without a key for it, written into every imported
config. ``mftcoder.py`` reads, translates and writes with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["REQUIRED", "LOSS_MODES", "MFTCoderConfigError", "Key", "MFTCODER_KEYS", "FIXED", "V04_RENAMED",
           "V04_DROPPED", "V04_NOTES", "is_placeholder"]

REQUIRED = object()  # no default: MftTrainArgs requires the key, and mft needs its value
_PLACEHOLDER = re.compile(r"^\$\{?[A-Za-z_][A-Za-z0-9_]*\}?$")
LOSS_MODES = {"case1": "token", "case2": "sample", "case3": "task", "case4": "task_sample", "coba": "coba"}
# model_type values MFTCoder loads with its own modelling code (utils/model_mapping.py), not transformers'.
_REMOTE_CODE_TYPES = ("aquila2", "baichuan", "chatglm2", "chatglm3", "qwen", "deepseek_v2")


class MFTCoderConfigError(ValueError):
    """An MFTCoder config that cannot be imported: the message names the file and the key, and what would be right."""



# -------------------------------------------------------------------------------------------------- converters
# Each takes (value, all MFTCoder args with defaults) and returns {mft key path: (value, comment)}, or a str: why
# the key has no counterpart here. A comment of "" means the meaning is the same.

Out = "dict[str, tuple[Any, str]] | str"


def is_placeholder(value: Any) -> bool:
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
    if is_placeholder(value):
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
    return None if is_placeholder(paths) else len(_split_list(paths, "data_paths"))


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
    moe = str(args.get("model_type") or "").endswith(("moe", "mixtral"))
    if not value:  # MFTCoder tests `if args.target_modules`: null, "" and [] all mean every linear layer
        return {"model.lora.target_modules": ("all-linear", "MFTCoder's default (null): every linear layer"
                                              + (f"; {_ALL_LINEAR_MOE}" if moe else ""))}
    if isinstance(value, str) and value != "all-linear":
        value = _split_list(value, "target_modules") if value.startswith("[") else [value]
    if value == "all-linear":
        return {"model.lora.target_modules": (value, _ALL_LINEAR_MOE if moe else "")}
    expert_names = sorted(set(value) & {"w1", "w2", "w3", "gate"})
    return {"model.lora.target_modules": (value, f"{', '.join(expert_names)}: {_EXPERT_NAMES}" if expert_names else "")}


# What MFTCoder's MoE targets become: transformers 5 fuses each layer's experts into 3-D parameters.
_ALL_LINEAR_MOE = ("in this MoE model all-linear covers attention, the routed experts (fused gate_up_proj / "
                   "down_proj, MFTCoder's per-expert w1, w3 / w2) and the router (gate), as MFTCoder's did, with "
                   "loss.router_aux_loss_coef left at the model config's (MFTCoder trains with "
                   "output_router_logits)")
_EXPERT_NAMES = ("w1 and w3 adapt the fused experts' gate_up_proj (one rank-r adapter per expert over both "
                 "halves; MFTCoder had one per half), w2 down_proj, gate the router")


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

# MFTCoder v0.4's self-paced loss (selfpaced_train_config.json) became CoBa in v0.5: its keys and what they are now.
V04_RENAMED = {"selfpaced_interval": "coba_update_interval", "selfpaced_history_length": "coba_history_length",
               "selfpaced_sample_valid_num": "coba_sample_valid_num"}
V04_DROPPED = {"selfpaced_scale_factor": (
    "v0.4's softmax scale of the self-paced weights has no successor: CoBa weighs by convergence slopes and a "
    "divergence factor (loss.coba_tau, its temperature, default 5)")}
V04_NOTES = "__v04_notes__"  # in the args read_mftcoder_config returns: [(v0.4 key, what it became)]

# What MFTCoder's trainer does without a key for it, written into every imported config.
FIXED: dict[str, tuple[Any, str]] = {
    "dtype": ("bf16", "MFTCoder loads and trains in bf16"),
    "model.activation_checkpointing": (True, "MFTCoder enables gradient checkpointing for every method"),
    "optimizer.betas": ([0.9, 0.999], "MFTCoder's AdamW"),
    "clip_grad_norm": (1.0, "MFTCoder's DeepSpeed config clips at 1.0 (its FSDP config does not clip)"),
    "data.task_sampling": ("proportional", "tasks sampled in proportion to their sizes, as MFTCoder's blend"),
    "data.truncation": ("drop", ""),
    "tensorboard": (True, ""),
}
