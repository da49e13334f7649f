"""Preference tuning per task (DPO, IPO, RPO, ORPO, SimPO): LoRA, QLoRA or full, one process or many (FSDP2).

    mft run preference_finetune_distributed --config qwen_dpo [--nproc-per-node 8] [key=value ...]

The setup, the loop, checkpoints, exact resume, early stopping, preemption and logging are the SFT recipe's
(``LoRAFinetuneRecipe`` in lora_finetune_distributed.py; read it first); this file changes what differs:

    - Data (``data: build_preference_data``): each ``data_paths`` entry is a task of preference pairs (MFTCoder's
      xxpo shape or TRL's), rendered with the SFT chat format, truncated as TRL / MFTCoder do; a pair's chosen and
      rejected sequences are packed side by side in one row (attention never crosses them).
    - Loss (``loss: PreferenceLoss``): ``preference: dpo | ipo | rpo | orpo | simpo`` per pair, reduced with
      ``mode: task`` (default, ``task_weights``) or ``sample`` exactly over the whole optimizer step on all ranks.
    - The reference (dpo, ipo, rpo): ``reference: auto`` is the model itself with its adapters switched off for
      LoRA / QLoRA (no second copy of the weights), and a frozen FSDP2-sharded copy of the base model for full
      fine-tuning; ``reference: precompute`` computes every pair's reference log-probs once before training and
      stores them in ``output_dir/reference_logps.pt``, keyed to the data and the model, so a resumed run (or a
      new run in that directory) reuses them and training needs one forward per sequence.
    - Metrics per task and overall (progress line, metrics.jsonl, TensorBoard): loss, reward accuracy, margin,
      chosen / rejected rewards and log-probs; validation reports the same on held-out pairs, and the best
      checkpoint and early stopping follow the mean of the per-task validation losses (or ``eval.code``).

``train_step`` is the SFT recipe's (``accumulate_gradients`` then ``optimizer_step``); ``accumulate_gradients``
below adds the reference log-probs to each micro-batch's loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mft_components.config import instantiate, parse
from mft_components.data.sampling import build_valid_loader
from mft_components.distributed import all_reduce_sum, end_worker
from mft_components.loss.preference import pair_logps
from mft_components.models import prepare_batch
from mft_components.models.lora import adapters_disabled
from mft_components.recipe_config.schema import PreferenceRecipeConfig
from mft_components.training.guards import EarlyStopping
from mft_components.training.metrics import MetricLogger, ProgressBar
from mft_components.training.preference_eval import PreferenceEvaluator
from mft_recipes.full_finetune_distributed import FullFinetuneRecipe
from mft_recipes.lora_finetune_distributed import LoRAFinetuneRecipe, run

CONFIG_SCHEMA = PreferenceRecipeConfig
REFERENCE_FILE = "reference_logps.pt"


class PreferenceFinetuneRecipe(LoRAFinetuneRecipe):
    """Preference tuning: the SFT recipe's setup and loop with pairs, a preference loss and a reference model.
    LoRA / QLoRA by default; ``model.method: full`` takes the full recipe's model and checkpoint methods."""

    METHODS = ("lora", "qlora", "full")
    OTHER_RECIPE = "preference_finetune_distributed"

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.full = cfg.model.get("method", "lora") == "full"

    # --------------------------------------------------------------------------------------- what differs: setup

    def _setup_loss(self) -> None:
        """The preference loss, checked against the tasks before the model loads."""
        self.loss_fn = instantiate(self.cfg.loss)
        self.loss_fn.setup(self.task_names)
        if self.loss_fn.cross_entropy == "liger" and self.device.type != "cuda":
            sys.exit("config error: loss.cross_entropy: liger runs on CUDA only; use chunked")

    def _setup_model(self, resume_from: Path | None) -> None:
        """The trained model, then the reference: adapters off (LoRA / QLoRA), a frozen copy (full), or the
        precomputed log-probs."""
        super()._setup_model(resume_from)
        self.reference_model, self.reference_tables = None, None
        if not self.loss_fn.needs_reference:
            return
        if self.full:
            # The base weights (model_dir of the config, also on resume), sharded as the trained model is.
            self.reference_model = instantiate(self.cfg.model, dtype=self.cfg.dtype, device=self.device,
                                               distributed=self.world_size > 1)
            self.reference_model.requires_grad_(False)
            self.reference_model.eval()
        if self.cfg.reference == "precompute":
            self.reference_tables = self._precomputed_reference()
            self.reference_model = None  # its log-probs are all stored: free it

    def _setup_output(self) -> None:
        """The SFT recipe's output, with the validation of held-out pairs instead of the validation loss."""
        cfg = self.cfg
        self.logger = MetricLogger(self.output_dir, enabled=self.is_rank0, tensorboard=cfg.tensorboard,
                                   start_step=self.position.step)
        self.progress = ProgressBar(self.position.total_steps, initial=self.position.step, enabled=self.is_rank0)
        loss_tracker = EarlyStopping() if self.code_evaluator.selects else self.early_stopping
        self.evaluator = PreferenceEvaluator(self.valid_batches, self.task_names, self.device, cfg.eval_every_n_steps,
                                             loss_tracker, self.logger, self.progress, self.loss_fn.ce_kwargs,
                                             loss_fn=self.loss_fn, reference=self.reference_logps)
        self.evaluator.load_state_dict(self.evaluator_state)
        self.code_evaluator.attach(self.logger, self.progress, self.output_dir, self.early_stopping)
        self.code_evaluator.load_state_dict(self.code_evaluator_state)

    # ------------------------------------------------------------------------------------------ the reference

    @torch.no_grad()
    def reference_logps(self, batch: dict, split: str = "train") -> torch.Tensor | None:
        """The reference's summed log-probs [P, 2] of a prepared micro-batch's pairs (None: orpo, simpo)."""
        if not self.loss_fn.needs_reference:
            return None
        if self.reference_tables is not None:
            return self.reference_tables[split][batch["pair_index"]]
        if self.reference_model is not None:
            model, switch = self.reference_model, contextlib.nullcontext()
        else:
            model, switch = self.model, adapters_disabled(self.model)
        with switch:
            token_losses, _ = model(batch, **self.loss_fn.ce_kwargs)
        return pair_logps(token_losses, batch)[0]

    def _reference_key(self) -> str:
        """What stored log-probs are valid for: the pairs' tokens, the base weights, dtype and loss settings."""
        weights = sorted(p.name + str(p.stat().st_size) + str(p.stat().st_mtime_ns)
                         for p in Path(self.base_model_dir).glob("*.safetensors"))
        record = {"data": self.data.fingerprint(), "model_dir": str(Path(self.base_model_dir).resolve()),
                  "weights": weights, "dtype": self.cfg.dtype, "ce": self.loss_fn.ce_kwargs,
                  "attn": OmegaConf.select(self.cfg, "model.attn_implementation", default="auto")}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def _precomputed_reference(self) -> dict[str, torch.Tensor]:
        """Every pair's reference log-probs, loaded when output_dir holds them for this data and model, else
        computed (each rank its share of the pairs, summed over ranks) and stored by rank 0 (collective)."""
        path, key = self.output_dir / REFERENCE_FILE, self._reference_key()
        if path.exists():
            stored = torch.load(path, weights_only=True)
            if stored.get("key") == key:
                if self.is_rank0:
                    print(f"reference log-probs: reusing {path}", flush=True)
                return {split: stored[split].to(self.device) for split in ("train", "valid")}
        tables = {}
        for split, samples in (("train", self.data.train_samples), ("valid", self.data.valid_samples)):
            table = torch.zeros(len(samples), 2, dtype=torch.float64, device=self.device)
            if samples:
                view = _SplitView(self.data, samples)
                loader = build_valid_loader(view, micro_batch_size=self.cfg.eval_micro_batch_size
                                            or self.cfg.micro_batch_size, rank=self.rank, world_size=self.world_size)
                for host in loader:
                    batch = prepare_batch(host, self.device, self.model.config)
                    logps = self.reference_logps(batch)
                    table[batch["pair_index"]] = logps.double()
            tables[split] = all_reduce_sum(table)
        if self.is_rank0:
            torch.save({"key": key, **{split: t.cpu() for split, t in tables.items()}}, path)
            print(f"reference log-probs of {len(tables['train'])} + {len(tables['valid'])} pairs stored in {path}",
                  flush=True)
        return tables

    # ------------------------------------------------------------------------------------------- the step

    def accumulate_gradients(self, host_batches: list[dict]) -> None:
        """Forward, preference loss and backward of this rank's micro-batches (the reference first, no grad)."""
        counts = self.loss_fn.step_counts(host_batches, device=self.device)  # pairs per task, all ranks
        for host in host_batches:
            batch = prepare_batch(host, self.device, self.model.config)
            ref = self.reference_logps(batch)
            token_losses, _ = self.model(batch, **self.loss_fn.ce_kwargs)
            share = self.loss_fn(token_losses, batch, counts, ref_logps=ref)
            (share * self.world_size).backward()  # FSDP averages gradients over ranks: undo it

    def evaluate_before_training(self) -> None:
        """As SFT's, without CoBa (not a preference reduction)."""
        if self.position.step == 0 and self.evaluator.valid_batches:
            self.evaluator.run(self.model, 0, track=False)
        if self.position.step == 0 and self.code_evaluator.enabled:
            self.code_evaluator.run(self.model, 0, track=False)
        if self.evaluations_pending:
            self.evaluations_pending, self.last_saved_step = False, None
            self.evaluate_and_save()

    def evaluate_step(self) -> bool:
        step = self.position.step
        loss_due = self.evaluator.due(step, self.position.epoch_end)
        improved = loss_due and self.evaluator.run(self.model, step)
        code_due = self.code_evaluator.due(step, loss_due)
        code_improved = code_due and self.code_evaluator.run(self.model, step)
        return code_improved if self.code_evaluator.selects else improved

    # ----------------------------------------------------------------- what is trained and saved: LoRA or full

    def build_model(self, resume_from: Path | None):
        return (FullFinetuneRecipe.build_model if self.full else LoRAFinetuneRecipe.build_model)(self, resume_from)

    def checkpoint_weights(self) -> dict:
        return (FullFinetuneRecipe.checkpoint_weights if self.full else LoRAFinetuneRecipe.checkpoint_weights)(self)

    def load_checkpoint(self, path: Path) -> None:
        (FullFinetuneRecipe.load_checkpoint if self.full else LoRAFinetuneRecipe.load_checkpoint)(self, path)


class _SplitView:
    """The data with ``samples`` as its validation split: what ``build_valid_loader`` reads to walk one split
    in order, every pair on exactly one rank."""

    def __init__(self, data, samples):
        self._data, self.valid_samples = data, samples

    def __getattr__(self, name):
        return getattr(self._data, name)


@parse(schema=CONFIG_SCHEMA)
def recipe_main(cfg: DictConfig) -> None:
    run(PreferenceFinetuneRecipe(cfg))


if __name__ == "__main__":
    recipe_main()
    end_worker()
