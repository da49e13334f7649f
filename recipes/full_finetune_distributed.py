"""Full-parameter multi-task fine-tuning, one process or many under torchrun (FSDP2).

    mft run full_finetune_distributed --config qwen_full [--nproc-per-node 8] [key=value ...]

Features:
    - Every weight trains (``model.method: full``); the model is built on the meta device, sharded with FSDP2 per
      decoder layer (parameters, gradients and AdamW state), and its weights streamed into the shards.
    - Multi-task data: one task per directory; bad data stops the run before any model is loaded.
    - MFTCoder's task-weighted losses (``loss.mode``: token, sample, task, task_sample, coba), normalised over the
      whole optimizer step (all micro-batches of all ranks), so a 1x4 and a 2x2 split of a batch train the same.
    - Gradient accumulation, gradient clipping, AdamW (fused on CUDA), cosine schedule with warmup and ``min_lr``,
      ``epochs`` or ``max_steps``, ``dtype: bf16 | fp32``, optional activation checkpointing and compile.
    - Evaluation every ``eval_every_n_steps``: overall and per-task validation loss and perplexity; CoBa weights
      from per-task validation losses; early stopping after ``early_stopping_patience`` evaluations without a
      new best.
    - Checkpoints in ``output_dir/step_N``: a Hugging Face model directory (sharded safetensors, config.json,
      tokenizer files; ``transformers`` loads it as it is) plus the recipe state for an exact resume (``resume: auto`` or a path); written atomically; ``saving_limit``
      keeps the newest and the best.
    - A progress bar, ``metrics.jsonl``, TensorBoard events in ``output_dir/tb``, and a final summary.
    - A non-finite loss stops the run naming the step and the tasks; the last checkpoint stays intact.

Copy it with ``mft cp full_finetune_distributed my_recipe.py``, edit, and run ``mft run my_recipe.py --config ...``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from mft_components import checkpoint as ck
from mft_components.config import instantiate, parse, to_container
from mft_components.data import DataError
from mft_components.distributed import destroy_distributed, gather_state_dict, init_distributed
from mft_components.metrics import (
    EarlyStopping,
    Evaluator,
    MetricLogger,
    NonFiniteLossError,
    ProgressBar,
    Throughput,
    check_finite,
    format_summary,
    peak_memory_gb,
)
from mft_components.recipe_schema import FullRecipeConfig

CONFIG_SCHEMA = FullRecipeConfig


class FullFinetuneRecipe:
    """Multi-task full fine-tuning. ``setup()`` builds everything, ``train()`` runs the loop."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.gas = cfg.gradient_accumulation_steps

    # ------------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        # 1. Process group first: everything after it may need the rank (nccl on GPU, gloo on CPU).
        self.rank, self.world_size, self.device = init_distributed()
        self.is_rank0 = self.rank == 0
        if self.is_rank0:
            print(f"config:\n{OmegaConf.to_yaml(cfg, resolve=True)}", flush=True)
            ck.remove_partial_checkpoints(self.output_dir)  # leftovers of a save that was killed
        # 2. The same seed on every rank: anything randomly initialised must agree across ranks.
        torch.manual_seed(cfg.seed)

        # 3-4. Tokenizer and data, validated before any model exists: a bad record costs seconds, not a model load.
        self.tokenizer = instantiate(cfg.tokenizer)
        self.data = instantiate(cfg.data, tokenizer=self.tokenizer, seed=cfg.seed, rank=self.rank,
                                world_size=self.world_size)
        self.task_names = self.data.task_names
        if self.is_rank0:
            print(self.data.format_stats(), flush=True)
        self.train_loader = self.data.train_loader(cfg.micro_batch_size, self.gas, self.rank, self.world_size)
        valid_batches = (
            list(self.data.valid_loader(cfg.eval_micro_batch_size or cfg.micro_batch_size, self.rank, self.world_size))
            if self.data.valid_samples else []
        )

        # 5. Model: meta-device build, FSDP2 shards, weights streamed into them. A full checkpoint is a Hugging Face
        #    model directory, so resuming builds the model straight from it (one weight load, not two).
        if cfg.model.get("method", "full") != "full":
            sys.exit(f"config error: model.method is {cfg.model.method!r}; this recipe does full fine-tuning "
                     "(use lora_finetune_distributed for lora or qlora)")
        self.base_model_dir = cfg.model.model_dir
        resume_from = ck.resolve_resume(cfg.resume, self.output_dir)
        weights_dir = {"model_dir": str(resume_from)} if resume_from is not None else {}
        self.model = instantiate(cfg.model, dtype=cfg.dtype, device=self.device, distributed=self.world_size > 1,
                                 **weights_dir)
        self.model.train()

        # 6. Optimizer over every parameter; fused AdamW on CUDA (one kernel for all parameters).
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" and "AdamW" in cfg.optimizer._component_ else {}
        self.optimizer = instantiate(cfg.optimizer, self.trainable, **fused)

        # 7. Schedule: total steps from epochs (each epoch's length from the sampler's plan) or max_steps.
        plan = self.train_loader.sampler.plan
        self.total_steps = cfg.max_steps or sum(plan.steps_per_epoch(e) for e in range(cfg.epochs))
        self.lr_scheduler = instantiate(cfg.lr_scheduler, self.optimizer, num_training_steps=self.total_steps)

        # 8. Loss: bound to the task list; CoBa keeps its history in its state.
        self.loss_fn = instantiate(cfg.loss)
        self.loss_fn.setup(self.task_names)

        self.early_stopping = EarlyStopping(patience=cfg.early_stopping_patience)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.last_saved_step = None

        # 9. Resume: optimizer, schedule, loss, data position and RNG of the checkpoint (weights loaded in 5).
        self.rank_state = None
        if resume_from is not None:
            self.load_checkpoint(resume_from)

        # 10. Output for people, on rank 0.
        self.logger = MetricLogger(self.output_dir, enabled=self.is_rank0, tensorboard=cfg.tensorboard)
        self.progress = ProgressBar(self.total_steps, initial=self.step, enabled=self.is_rank0)
        self.evaluator = Evaluator(valid_batches, self.task_names, self.device, cfg.eval_every_n_steps,
                                   self.early_stopping, self.logger, self.progress)

    # -------------------------------------------------------------------------------------------------- train

    def train(self) -> None:
        cfg = self.cfg
        plan = self.train_loader.sampler.plan
        throughput = Throughput()
        start = time.perf_counter()
        stop_reason = f"reached {self.total_steps} steps"
        while self.step < self.total_steps:
            if self.step_in_epoch >= plan.steps_per_epoch(self.epoch):  # the saved epoch was complete
                self.epoch, self.step_in_epoch, self.rank_state = self.epoch + 1, 0, None
            self.train_loader.sampler.set_epoch(self.epoch)
            if self.rank_state is not None:  # mid-epoch resume: continue where the checkpoint stopped
                self.train_loader.load_state_dict(self.rank_state["dataloader"])
            batches = iter(self.train_loader)
            if self.rank_state is not None:  # after iter(): creating an iterator draws from the RNG
                ck.restore_rng_state(self.rank_state["rng"])
                self.rank_state = None

            while self.step_in_epoch < plan.steps_per_epoch(self.epoch) and self.step < self.total_steps:
                micro_batches = [{k: v.to(self.device) for k, v in next(batches).items()} for _ in range(self.gas)]

                # Global per-task counts first (one all-reduce), then each micro-batch adds its exact share.
                counts = self.loss_fn.step_counts(micro_batches)
                for batch in micro_batches:
                    token_losses, aux_loss = self.model(batch, chunk_size=self.loss_fn.chunk_size)
                    share = self.loss_fn(token_losses, batch, counts, aux_loss=aux_loss)
                    (share * self.world_size).backward()  # FSDP averages gradients over ranks: undo it
                metrics = self.loss_fn.step_metrics()  # all-reduced: every rank sees the same loss

                # Stop before the optimizer step, so the weights (and the last checkpoint) stay finite.
                check_finite(torch.tensor(metrics["loss"]), self.step + 1, [b["task_ids"] for b in micro_batches],
                             self.task_names)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.clip_grad_norm or float("inf"))
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.lr_scheduler.step()
                self.step += 1
                self.step_in_epoch += 1
                throughput.add_step(micro_batches, self.device)

                if self.step % cfg.log_every_n_steps == 0 or self.step == self.total_steps:
                    tokens_per_s = throughput.rate()
                    self.logger.log("train", self.step, {
                        **metrics, "lr": lr, "grad_norm": _item(grad_norm), "epoch": self.epoch,
                        "tokens_per_s": tokens_per_s, "peak_memory_gb": peak_memory_gb(self.device),
                    })
                    self.progress.update(self.step, metrics["loss"], lr, tokens_per_s)

                self.evaluator.update_coba(self.model, self.loss_fn, self.step)
                epoch_end = self.step_in_epoch == plan.steps_per_epoch(self.epoch)
                improved = self.evaluator.due(self.step, epoch_end) and self.evaluator.run(self.model, self.step)
                if self.early_stopping.should_stop:
                    stop_reason = (f"early stopping: {self.early_stopping.bad_evals} evaluations without a loss "
                                   f"below step {self.early_stopping.best_step}'s")
                    break
                if cfg.save_every_n_steps and (self.step % cfg.save_every_n_steps == 0 or improved):
                    self.save_checkpoint()
            else:
                continue  # the epoch (or the run) ended normally: next epoch
            break  # early stopping

        # The end: evaluate if the last step was not evaluated, then the final checkpoint.
        if not self.evaluator.evaluated(self.step):
            self.evaluator.run(self.model, self.step)
        if self.last_saved_step != self.step:
            self.save_checkpoint()
        self.progress.close()
        if self.is_rank0:
            print(format_summary(steps=self.step, seconds=time.perf_counter() - start, stop_reason=stop_reason,
                                 early_stopping=self.early_stopping, best_eval=self.evaluator.best,
                                 checkpoints=[p for _, p in ck.list_checkpoints(self.output_dir)],
                                 output_dir=self.output_dir), flush=True)

    # ------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> None:
        """HF-format weights + recipe state into output_dir/step_N; collective, rank 0 writes."""
        weights = gather_state_dict(self.model, adapter_only=False)  # full tensors on rank 0, one at a time
        state = ck.gather_training_state(
            self.model, self.optimizer, lr_scheduler=self.lr_scheduler, loss_fn=self.loss_fn,
            early_stopping=self.early_stopping, train_loader=self.train_loader,
            step=self.step, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
        )
        if self.is_rank0:
            path = ck.save_checkpoint(
                self.output_dir, self.step,
                weights=weights,
                model_config=self.model.config.to_dict(),
                base_model_dir=self.base_model_dir,
                meta=ck.checkpoint_meta(self.model, self.data, self.tokenizer, self.evaluator.last,
                                        to_container(self.cfg), base_model_dir=self.base_model_dir),
                recipe_state=state,
            )
            best = self.early_stopping.best_step
            ck.prune_checkpoints(self.output_dir, self.cfg.saving_limit, keep=(best,) if best else ())
            self.progress.write(f"saved {path}")
        self.last_saved_step = self.step
        if dist.is_initialized():
            dist.barrier()

    def load_checkpoint(self, path: Path) -> None:
        """Restore the recipe state (``torch.load(weights_only=True)``) from ``path``; the weights came with the model."""
        state = ck.load_recipe_state(path)
        self.rank_state = ck.restore_training_state(
            state, self.model, self.optimizer, lr_scheduler=self.lr_scheduler, loss_fn=self.loss_fn,
            early_stopping=self.early_stopping, rank=self.rank, world_size=self.world_size,
        )
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.last_saved_step = self.step
        if self.is_rank0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def cleanup(self) -> None:
        self.logger.close()
        self.progress.close()
        destroy_distributed()


def _item(t) -> float:
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


@parse(schema=CONFIG_SCHEMA)
def recipe_main(cfg: DictConfig) -> None:
    recipe = FullFinetuneRecipe(cfg)
    try:
        recipe.setup()
    except DataError as e:  # reported before any model was built
        sys.exit(f"data error:\n{e}")
    try:
        recipe.train()
    except NonFiniteLossError as e:
        if recipe.is_rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        recipe.cleanup()
        sys.exit(1)
    recipe.cleanup()


if __name__ == "__main__":
    recipe_main()
