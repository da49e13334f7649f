"""The keys the fine-tuning recipes read, as a dataclass that ``mft validate`` and the recipes' ``@parse`` check.

Top-level training keys are typed fields (a misspelt or mistyped key is reported with the closest valid one;
``minimum`` in a field's metadata bounds its value). The sections ``model``, ``tokenizer``, ``data``, ``loss``,
``optimizer`` and ``lr_scheduler`` are ``_component_`` nodes: their arguments are checked against the builder's
signature, and ``runtime_args`` lists the arguments the recipe itself passes at run time (so they may, and
should, be absent from the config). What a schema cannot say (value ranges inside the sections, the model
directory, the task names) is checked by ``semantic_checks`` (``checks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

from mft_components.code_eval.options import CodeEvalOptions
from mft_components.recipe_config.checks import (check_code_eval, check_metric_loggers, check_preference,
                                                 check_recipe_config)
from mft_components.training.preemption import DEFAULT_GRACE_S

__all__ = ["RecipeConfig", "LoRARecipeConfig", "FullRecipeConfig", "PreferenceRecipeConfig", "EvalConfig"]


def _component(*runtime_args: str, default: dict | None = None) -> Any:
    meta = {"runtime_args": runtime_args}
    if default is None:
        return field(metadata=meta)
    return field(default_factory=lambda: dict(default), metadata=meta)


def _at_least(minimum: int | float, default: Any) -> Any:
    """A number field whose value must be >= ``minimum`` (null, where the type allows it, is always fine)."""
    return field(default=default, metadata={"minimum": minimum})


def _positive(default: Any) -> Any:
    """A number field whose value must be > 0."""
    return field(default=default, metadata={"minimum": 0, "exclusive": True})


@dataclass
class EvalConfig:
    """``eval``: evaluations beyond the validation loss.

    Attributes:
        code: execution-based evaluation (pass@k per task; ``mft_components.code_eval.evaluate.CodeEvalOptions``),
            or null.
    """

    code: CodeEvalOptions | None = None


@dataclass
class RecipeConfig:
    """Keys of ``lora_finetune_distributed`` and ``full_finetune_distributed``.

    Attributes:
        output_dir: checkpoints (``step_N/``), ``metrics.jsonl`` and TensorBoard events (``tb/``) go here.
        model: ``mft_components.models.build_model`` node (``model_dir``, ``method``, ``lora``, ...).
        tokenizer: ``mft_components.models.load_tokenizer`` node (``path``).
        data: ``mft_components.data.build_mft_data`` node (``data_paths``, ``seq_len``, ``packing``, ...).
        loss: ``mft_components.loss.TaskWeightedLoss`` node (``mode``, ``task_weights``, CoBa settings).
        optimizer: an optimizer class node, e.g. ``torch.optim.AdamW`` (``lr``, ``weight_decay``, ``betas``);
            the parameters are passed by the recipe, and ``fused=True`` on CUDA.
        lr_scheduler: ``mft_components.training.lr_schedule.cosine_with_warmup`` node (``warmup_steps``, ``min_lr``).
        seed: seeds torch, numpy and python on every rank, and the data split and order (an integer >= 0).
        dtype: parameter and compute dtype: ``bf16`` or ``fp32``.
        epochs: passes over the training data, at least 1 (ignored when ``max_steps`` ends the run first).
        max_steps: stop after this many optimizer steps, at least 1 (null: ``epochs`` decides).
        micro_batch_size: rows of ``seq_len`` tokens per micro-batch per rank.
        gradient_accumulation_steps: micro-batches per optimizer step per rank. The global batch is
            ``micro_batch_size x gradient_accumulation_steps x world_size`` rows.
        clip_grad_norm: clip the global gradient norm to this positive number (null: no clipping; the norm is
            still logged).
        eval_every_n_steps: evaluate on the validation split every N steps (null: at the end of each epoch).
        eval_micro_batch_size: micro-batch size for evaluation (null: ``micro_batch_size``).
        early_stopping_patience: stop after this many evaluations without a lower validation loss (null: never).
        save_every_n_steps: also checkpoint every N steps (null: only at the end).
        saving_limit: keep the N >= 1 newest checkpoints plus the best one (null: keep all).
        resume: ``auto`` (newest whole checkpoint in ``output_dir``, else a fresh start), a ``step_N`` directory,
            or null (start fresh).
        log_every_n_steps: write a ``metrics.jsonl`` line every N steps.
        tensorboard: also write TensorBoard events to ``output_dir/tb``.
        metric_loggers: W&B, MLflow, TensorBoard as well as metrics.jsonl: names (``[tensorboard, wandb,
            mlflow]``) or ``_component_`` nodes (``training/loggers.py``: ``WandBLogger``, ``MLflowLogger``, or
            your own class); null: metrics.jsonl and, with ``tensorboard``, TensorBoard.
        plots: at the end of the run, draw its curves into ``output_dir/plots`` (``mft plot``; needs matplotlib).
        distributed_timeout_s: under torchrun, how long a rank waits in one collective (all-reduce, FSDP's
            gathers) for the other ranks before the run ends with a message naming the rank that stopped answering
            (null: torch's default, 30 min). Work one rank does alone (checkpoint writes, the data cache build,
            code-evaluation programs) is waited for in step and is not bounded by it.
        eval: ``code``: pass@k of generated code per task (:class:`EvalConfig`).
        save_on_preemption: on SIGTERM / SIGINT, every rank finishes its optimizer step, they save a checkpoint
            together and the run exits with status 75 (``resume: auto`` continues it); false: it ends at once
            with 128 + the signal's number (``training/preemption.py``).
        preemption_grace_s: after that signal, end the process anyway after this many seconds (null: no limit);
            keep it below the scheduler's kill delay. ``mft run --nproc-per-node`` gives torchrun 10 s more.
    """

    output_dir: str
    model: dict = _component("device", "distributed", "dtype")
    tokenizer: dict = _component()
    data: dict = _component("tokenizer", "seed", "rank", "world_size")
    optimizer: dict = _component("params")
    loss: dict = _component(default={"_component_": "mft_components.loss.TaskWeightedLoss"})
    lr_scheduler: dict = _component(
        "optimizer", "num_training_steps", default={"_component_": "mft_components.training.lr_schedule.cosine_with_warmup"}
    )
    seed: int = _at_least(0, 42)
    dtype: Literal["bf16", "fp32"] = "bf16"
    epochs: int = _at_least(1, 1)
    max_steps: int | None = _at_least(1, None)
    micro_batch_size: int = _at_least(1, 1)
    gradient_accumulation_steps: int = _at_least(1, 1)
    clip_grad_norm: float | None = _positive(1.0)
    eval_every_n_steps: int | None = _at_least(1, None)
    eval_micro_batch_size: int | None = _at_least(1, None)
    early_stopping_patience: int | None = _at_least(1, None)
    save_every_n_steps: int | None = _at_least(1, None)
    saving_limit: int | None = _at_least(1, None)
    resume: str | None = None
    log_every_n_steps: int = _at_least(1, 1)
    tensorboard: bool = True
    metric_loggers: list | None = None
    plots: bool = True
    distributed_timeout_s: float | None = _positive(600.0)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save_on_preemption: bool = True
    preemption_grace_s: float | None = _positive(DEFAULT_GRACE_S)

    # Cross-checks against the model directory, the tasks and the components' own rules (config.check_config).
    semantic_checks: ClassVar[tuple[Callable[[dict, set], list[str]], ...]] = (
        check_recipe_config, check_code_eval, check_metric_loggers)


def _method_check(recipe: str, methods: tuple[str, ...], other: str) -> Callable[[dict, set], list[str]]:
    """``model.method`` against what ``recipe`` trains (the recipe would stop on it after building the data)."""

    def check_method(cfg: dict, flagged: set[str]) -> list[str]:
        model = cfg.get("model")
        if "model" in flagged or not isinstance(model, dict):
            return []
        method = model.get("method", "lora")  # build_model's default
        if method in methods or method not in ("lora", "qlora", "full"):  # an unknown one: build_model's message
            return []
        given = repr(method) if "method" in model else f"absent (build_model's default: {method})"
        return [f"'model.method' is {given}: {recipe} trains {' or '.join(methods)}; run {method} with {other}"
                + (" (or set model.method: full)" if "method" not in model else "")]

    return check_method


@dataclass
class LoRARecipeConfig(RecipeConfig):
    """``lora_finetune_distributed``'s keys: :class:`RecipeConfig`, with ``model.method`` lora or qlora."""

    semantic_checks: ClassVar[tuple[Callable[[dict, set], list[str]], ...]] = (
        *RecipeConfig.semantic_checks, _method_check("lora_finetune_distributed", ("lora", "qlora"),
                                                     "full_finetune_distributed"))


@dataclass
class FullRecipeConfig(RecipeConfig):
    """``full_finetune_distributed``'s keys: :class:`RecipeConfig`, with ``model.method: full``."""

    semantic_checks: ClassVar[tuple[Callable[[dict, set], list[str]], ...]] = (
        *RecipeConfig.semantic_checks, _method_check("full_finetune_distributed", ("full",),
                                                     "lora_finetune_distributed"))


@dataclass
class PreferenceRecipeConfig(RecipeConfig):
    """``preference_finetune_distributed``'s keys: :class:`RecipeConfig` with ``model.method`` lora, qlora or
    full, ``data`` a ``build_preference_data`` node, ``loss`` a ``PreferenceLoss`` node, and:

    Attributes:
        reference: where dpo / ipo / rpo get the reference log-probs: ``auto`` (LoRA / QLoRA: the model with its
            adapters off; full: a frozen sharded copy of the base model) or ``precompute`` (computed once before
            training, stored in output_dir, reused on resume).
    """

    loss: dict = _component(default={"_component_": "mft_components.loss.preference.PreferenceLoss"})
    reference: Literal["auto", "precompute"] = "auto"

    semantic_checks: ClassVar[tuple[Callable[[dict, set], list[str]], ...]] = (
        *RecipeConfig.semantic_checks, check_preference)
