"""The one table of MFTCoder's preference train-config keys (``XXPOTrainArgs``, ``xxpo/xxpo_arguments.py``; the
``dpo_train_config.json`` that ``xxpo_accelerate.py`` reads) and what each becomes in an mft config for the recipe
``preference_finetune_distributed``: ``XXPO_KEYS``, key -> ``Key(default, JSON types, converter)``, as
``mftcoder_keys.MFTCODER_KEYS`` is for the multi-task SFT trainer (shared converters are reused from there).

What ``xxpo_accelerate.py`` does with them decides the translation, not the field's comment: it hands the values to
TRL's ``DPOConfig`` / ``ORPOConfig`` (``xxpo: dpo`` with ``rpo_alpha`` is TRL's RPO), never passes ``weight_decay``,
``min_lr``, ``seq_length`` or the early-stopping and resume keys on, concatenates every ``data_paths`` file into one
dataset (mft keeps each a task), and renders prompts with the tokenizer's chat template (MFTCoder's markers).
"""

from __future__ import annotations

from typing import Any, Callable

from mft_components.interop.mftcoder_keys import (
    LEGACY,
    REQUIRED,
    Key,
    MFTCoderConfigError,
    Out,
    _attention,
    _data_paths,
    _dropped,
    _init_timeout,
    _lora,
    _peft_type,
    _same,
    _target_modules,
    _tokenizer_type,
)

__all__ = ["XXPO_KEYS", "XXPO_FIXED", "XXPO_RECIPE", "XXPO_LOSSES"]

XXPO_RECIPE = "preference_finetune_distributed"
XXPO_LOSSES = ("dpo", "orpo")  # what xxpo_accelerate.py builds a trainer for
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float": "fp32", "float32": "fp32"}
_NOT_PASSED = "xxpo_accelerate.py does not pass it to TRL"


def _data_paths_as_tasks(value: Any, args: dict) -> Out:
    out = _data_paths(value, args)
    (target, (paths, comment)), = out.items()
    if comment:
        comment = ("one task per file: mft reduces the loss per task (loss.mode) and reports each task's reward "
                   "accuracy; MFTCoder concatenated the files into one dataset")
    return {target: (paths, comment)}


def _valid_split(value: Any, args: dict) -> Out:
    try:
        parts = [float(x) for x in str(value).replace("/", ",").split(",")][:2]
    except ValueError:
        raise MFTCoderConfigError(f"data_split: {value!r} is not a split; expected \"train,valid\" shares such as "
                                  "\"99,1\"") from None
    if len(parts) < 2 or parts[0] <= 0 or parts[1] < 0:
        raise MFTCoderConfigError(f"data_split: {value!r}; expected positive \"train,valid\" shares such as \"99,1\"")
    ratio = round(parts[1] / (parts[0] + parts[1]), 6)
    return {"data.valid_ratio": (ratio, "valid / (train + valid) of each task's pairs, as MFTCoder's "
                                        "train_test_split (which split the concatenated pairs, not each file)")}


def _xxpo(value: Any, args: dict) -> Out:
    if value not in XXPO_LOSSES:
        raise MFTCoderConfigError(f"xxpo: {value!r}; expected dpo or orpo (the trainers xxpo_accelerate.py builds)")
    if value == "orpo":
        return {"loss.preference": ("orpo", "TRL's ORPOTrainer: odds-ratio term + NLL on chosen, no reference "
                                                 "model")}
    if args["rpo_alpha"] is not None:
        return {"loss.preference": ("rpo", "xxpo dpo with rpo_alpha: TRL's DPO sigmoid loss + rpo_alpha x the "
                                                "NLL of the chosen answer (RPO)")}
    return {"loss.preference": ("dpo", "TRL's DPOTrainer, sigmoid loss")}


def _beta(value: Any, args: dict) -> Out:
    if args["xxpo"] == "orpo":
        return {"loss.beta": (value, "ORPO's lambda, the weight of the odds-ratio term (TRL's beta)")}
    return {"loss.beta": (value, "")}


def _rpo_alpha(value: Any, args: dict) -> Out:
    if value is None:
        return "null: no NLL term (plain DPO)"
    if args["xxpo"] == "orpo":
        return "not used with xxpo orpo: ORPO's loss holds its own NLL term on the chosen answer"
    return {"loss.rpo_alpha": (value, "")}


def _weight_decay(value: Any, args: dict) -> Out:
    return {"optimizer.weight_decay": (0.0, f"{_NOT_PASSED} (it is {value} there): transformers' default 0.0 "
                                            "applied, as here")}


def _scheduler(value: Any, args: dict) -> Out:
    if value == "cosine":
        return "transformers' cosine: warmup, then cosine down to 0 (lr_scheduler.min_lr 0.0)"
    if value in ("constant", "constant_with_warmup"):
        return {"lr_scheduler.min_lr": (args["learning_rate"], f"MFTCoder's {value}: a cosine that ends at the peak "
                                                                "lr")}
    return (f"{value!r} has no counterpart: mft's schedule is linear warmup then cosine down to min_lr; imported as "
            "that")


def _warmup(value: Any, args: dict) -> Out:
    if args["lr_scheduler_type"] == "constant":  # transformers' constant schedule has no warmup
        return {"lr_scheduler.warmup_steps": (0, f"MFTCoder's constant schedule has no warmup ({value} ignored)")}
    if isinstance(value, float) and value < 1:
        return {"lr_scheduler.warmup_steps": (value, "a fraction of the run's optimizer steps, as transformers "
                                                     "reads a warmup_steps below 1")}
    return {"lr_scheduler.warmup_steps": (int(value), "optimizer steps, as transformers' Trainer counts them")}


def _optimizer(value: Any, args: dict) -> Out:
    if value in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        return "optimizer: torch.optim.AdamW, betas (0.9, 0.999), as transformers' adamw_torch"
    return (f"{value!r}: mft's configs use torch.optim.AdamW (optimizer._component_ takes any torch optimizer); "
            "imported as AdamW")


def _gradient_checkpointing(value: Any, args: dict) -> Out:
    return {"model.activation_checkpointing": (bool(value), "")}


def _max_steps(value: Any, args: dict) -> Out:
    if value is None or value < 1:
        return {"max_steps": (None, "MFTCoder's -1: the epochs decide")}
    return {"max_steps": (value, "")}


def _every(target: str) -> Callable[[Any, dict], Out]:
    def convert(value: Any, args: dict) -> Out:
        if value is None or value < 1:
            return {target: (None, "")}
        return {target: (value, "")}
    return convert


def _saving_limit(value: Any, args: dict) -> Out:
    if value is None or value < 1:
        return {"saving_limit": (None, "keep every checkpoint, as transformers' save_total_limit null")}
    return {"saving_limit": (value, "the newest N plus the best (transformers' save_total_limit also kept the best)")}


def _dtype(value: Any, args: dict) -> Out:
    if value not in _DTYPES:
        raise MFTCoderConfigError(f"dtype: {value!r}; expected one of {', '.join(_DTYPES)}")
    if value != "bfloat16":
        return {"dtype": (_DTYPES[value], "xxpo_accelerate.py loads the model in bfloat16 and trains with bf16 "
                                          f"whatever dtype says; this is the dtype {value!r} asked for")}
    return {"dtype": ("bf16", "")}


def _length(target: str) -> Callable[[Any, dict], Out]:
    def convert(value: Any, args: dict) -> Out:
        if value is None:
            return f"null: {target} keeps the recipe's default"
        return {target: (value, "tokens, as TRL's DPOConfig / ORPOConfig read it (MFTCoder passed it on)")}
    return convert


def _chat_template(value: Any, args: dict) -> Out:
    if value is None:
        return "null: MFTCoder's markers <s>system/human/bot, mft's default (data.template: mft)"
    return ("a custom chat template: mft renders MFTCoder's markers (data.template: mft, data.role_markers to change "
            "them) or the tokenizer's own template (data.template: hf); set the one your SFT stage trained with")


def _sanity_check(value: Any, args: dict) -> Out:
    if value:
        return ("true read only the first 100 pairs of each file in MFTCoder; mft reads every pair (use max_steps for "
                "a short run)")
    return "false: every pair is read, as in mft"


_STR, _INT, _NUM, _BOOL, _NONE = (str,), (int,), (int, float), (bool,), (type(None),)

# The key table: every XXPOTrainArgs field, in its order.
XXPO_KEYS: dict[str, Key] = {
    "data_paths": Key(REQUIRED, _STR + (list,), _data_paths_as_tasks),
    "output_dir": Key(REQUIRED, _STR, _same("output_dir")),
    "tb_dir": Key(REQUIRED, _STR + _NONE, _dropped("mft writes TensorBoard events to output_dir/tb (tensorboard: true)")),
    "pretrained_model_path": Key(REQUIRED, _STR, _same("model.model_dir", "the SFT stage's model (an exported "
                                                                          "directory); also the tokenizer's path")),
    "model_type": Key(REQUIRED, _STR + _NONE, _dropped("mft reads the architecture from the model's config.json")),
    "data_split": Key("98,2,0", _STR, _valid_split),
    "peft_type": Key("qlora", _STR + _NONE, _peft_type),
    "quantization": Key("4bit", _STR + _NONE, _dropped(
        "MFTCoder derives it from peft_type (qlora: 4-bit NF4, else none) and ignores the key")),
    "lora_rank": Key(96, _INT, _lora("rank")),
    "lora_alpha": Key(32, _NUM, _lora("alpha")),
    "lora_dropout": Key(0.05, _NUM, _lora("dropout")),
    "target_modules": Key(None, _STR + (list,) + _NONE, _target_modules),
    "xxpo": Key("dpo", _STR, _xxpo),
    "beta": Key(0.1, _NUM, _beta),
    "rpo_alpha": Key(None, _NUM + _NONE, _rpo_alpha),
    "per_device_train_batch_size": Key(8, _INT, _same("micro_batch_size", "per rank, as in MFTCoder (pairs there)")),
    "per_device_eval_batch_size": Key(8, _INT, _same("eval_micro_batch_size")),
    "tokenizer_type": Key("AutoTokenizer", _STR, _tokenizer_type),
    "learning_rate": Key(5e-5, _NUM, _same("optimizer.lr")),
    "min_lr": Key(5e-6, _NUM, _dropped(f"{_NOT_PASSED}: transformers' schedules decay to 0 (lr_scheduler.min_lr 0.0)")),
    "weight_decay": Key(0.01, _NUM, _weight_decay),
    "gradient_accumulation_steps": Key(1, _INT, _same("gradient_accumulation_steps")),
    "lr_scheduler_type": Key("cosine", _STR, _scheduler),
    "optimizer_type": Key("adamw_torch", _STR, _optimizer),
    "gradient_checkpointing": Key(True, _BOOL, _gradient_checkpointing),
    "gradient_checkpointing_use_reentrant": Key(False, _BOOL, _dropped(
        "mft's activation checkpointing is always the non-reentrant kind")),
    "warmup_steps": Key(0.05, _NUM, _warmup),
    "num_train_epochs": Key(4, _INT, _same("epochs")),
    "seed": Key(1234, _INT, _same("seed")),
    "seq_length": Key(4096, _INT, _dropped(f"{_NOT_PASSED}: max_prompt_length and max_length bound the pairs")),
    "save_only_model": Key(True, _BOOL, _dropped(
        "mft's checkpoints always hold the optimizer, schedule and data position, for exact resume")),
    "resume_from_checkpoint": Key(None, _STR + _NONE, _dropped(
        f"{_NOT_PASSED} (its runs never resume); mft resumes its own checkpoints with resume: auto")),
    "auto_resume": Key(True, _BOOL, _dropped(f"{_NOT_PASSED}; mft resumes its own checkpoints with resume: auto")),
    "logging_steps": Key(10, _INT, _same("log_every_n_steps")),
    "save_steps": Key(100, _INT, _every("save_every_n_steps")),
    "eval_steps": Key(100, _INT, _every("eval_every_n_steps")),
    "max_steps": Key(-1, _INT + _NONE, _max_steps),
    "epoch_checkpointing": Key(False, _BOOL, _dropped(
        "mft checkpoints every save_every_n_steps, at each new best evaluation and at the end")),
    "shuffle_before_split": Key(True, _BOOL, _dropped(
        "mft's validation split is a seeded random draw per task (MFTCoder's train_test_split always shuffled)")),
    "early_stopping": Key(True, _BOOL, _dropped(f"{_NOT_PASSED} (no early stopping there); mft's is "
                                                "early_stopping_patience")),
    "early_stopping_stall_num": Key(5, _INT, _dropped(f"{_NOT_PASSED}; see early_stopping")),
    "saving_limit": Key(None, _INT + _NONE, _saving_limit),
    "attn_implementation": Key("flash_attention_2", _STR, _attention),
    "chat_template": Key(None, _STR + _NONE, _chat_template),
    "distributed_type": Key(None, _STR + _NONE, _dropped(
        "mft shards with FSDP2 under torchrun: mft run RECIPE --config CONFIG --nproc-per-node N")),
    "init_timeout_seconds": Key(3600, _INT + _NONE, _init_timeout),
    "make_vocab_size_divisible_by": Key(32, _INT, _dropped(LEGACY)),
    "model_parallel_size": Key(1, _INT, _dropped(LEGACY)),
    "use_slow_tokenizer": Key(False, _BOOL, _dropped(LEGACY)),
    "world_size": Key(8, _INT, _dropped(f"{LEGACY}: the process count comes from the launcher "
                                        "(mft run ... --nproc-per-node N)")),
    "max_prompt_length": Key(2048, _INT + _NONE, _length("data.max_prompt_length")),
    "max_length": Key(4096, _INT + _NONE, _length("data.max_length")),
    "dataset_num_proc": Key(1, _INT, _dropped("mft tokenises once and caches the result")),
    "dtype": Key("bfloat16", _STR, _dtype),
    "disable_tqdm": Key(False, _BOOL, _dropped("mft prints a progress bar on rank 0 and writes metrics.jsonl")),
    "sanity_check": Key(False, _BOOL, _sanity_check),
    "ignore_bias_buffers": Key(True, _BOOL, _dropped(
        "a DistributedDataParallel workaround for boolean buffers; FSDP2 needs none")),
}

# What xxpo_accelerate.py does without a key for it, written into every imported config.
XXPO_FIXED: dict[str, tuple[Any, str]] = {
    "optimizer.betas": ([0.9, 0.999], "transformers' AdamW defaults"),
    "lr_scheduler.min_lr": (0.0, "transformers' schedules decay to 0"),
    "clip_grad_norm": (1.0, "transformers' Trainer clips at max_grad_norm 1.0"),
    "loss.mode": ("sample", "the mean over pairs, as TRL's trainers average a batch (mft's task mode, the "
                            "recipe's default, would weigh every task alike)"),
    "data.task_sampling": ("proportional", "every pair once an epoch, as MFTCoder's concatenated dataset"),
    "tensorboard": (True, ""),
    "reference": ("auto", "as MFTCoder: LoRA / QLoRA take the model with its adapters off as the reference, full "
                          "fine-tuning a frozen copy; precompute stores them once before training"),
}
