"""LoRA / QLoRA multi-task fine-tuning, one process or many under torchrun (FSDP2).

    mft run lora_finetune_distributed --config qwen_qlora [--nproc-per-node 8] [key=value ...]

How it reads, top to bottom:
    - ``setup()`` builds one component per ``_setup_*`` method, in the order they depend on each other (process
      group, which checkpoint to resume, tokenizer and data, loaders, code evaluator, loss, model, optimizer, LR
      schedule, the resumed state, output and evaluators); data, eval sets and loss settings are checked before
      the model loads.
    - ``train_step()`` is one optimizer step: forward, loss and backward of this rank's micro-batches, gradient
      clipping, the non-finite guard, the optimizer and the schedule. Change the step here.
    - ``train()`` is the loop around it; logging, evaluation, checkpoints and the end of the run are named methods,
      and where the loop is (epochs, resuming mid-epoch with the RNG as saved) is ``TrainingPosition``
      (mft_components/training/position.py).
    - What is trained and how it is saved are ``build_model``, ``checkpoint_weights`` and ``load_checkpoint``
      (``full_finetune_distributed`` overrides just those).

Features:
    - LoRA adapters on a frozen base (``model.method: lora``) or on a 4-bit NF4 base (``qlora``); the base model is
      built on the meta device, sharded with FSDP2 per decoder layer and its weights streamed into the shards.
    - Multi-task data: one task per directory; bad data stops the run before any model is loaded.
    - MFTCoder's task-weighted losses (``loss.mode``: token, sample, task, task_sample, coba), normalised over the
      whole optimizer step (all micro-batches of all ranks), so a 1x4 and a 2x2 split of a batch train the same.
    - Gradient accumulation, gradient clipping, AdamW (fused on CUDA), cosine schedule with warmup and ``min_lr``,
      ``epochs`` or ``max_steps``, ``dtype: bf16 | fp32``, optional activation checkpointing and compile.
    - Evaluation every ``eval_every_n_steps``: overall and per-task validation loss and perplexity; CoBa weights
      from per-task validation losses; early stopping after ``early_stopping_patience`` evaluations without a
      new best.
    - Execution-based evaluation (``eval.code``): pass@1 / pass@k of generated code per task, sandboxed; with
      ``select_by: pass@1`` early stopping and the best checkpoint follow it instead of the validation loss.
    - Checkpoints in ``output_dir/step_N``: the adapter in PEFT's format (``peft`` and ``mft export`` load it) plus
      the recipe state for an exact resume (``resume: auto`` or a path); written atomically; ``saving_limit``
      keeps the newest and the best.
    - A progress bar, ``metrics.jsonl``, TensorBoard events in ``output_dir/tb``, a final summary and plots
      (``output_dir/plots``); W&B and MLflow (``metric_loggers``) on a background thread, continuing the same runs
      on resume.
    - A non-finite loss or gradient norm stops the run naming the step and the tasks, and never reaches the
      weights, so the last checkpoint stays intact (``NonFiniteGuard``: on CUDA with fused AdamW the update is
      skipped on a device flag and the run stops at the next log step or checkpoint).
    - On a GPU the loop does not wait for the device between log steps: batches come from pinned memory with
      non-blocking copies, everything the forward needs from the host (attention boundaries, loss-token
      positions, per-task counts) is computed from the host copy, and losses, token counts and the gradient
      norm stay on the device until a log step reads them.
    - Checkpoints carry a consistency record (size and sha256 of each file) that resume checks; ``resume: auto``
      moves a damaged checkpoint aside and continues from the newest intact one.
    - Under torchrun a collective that a rank never joins (a stopped or frozen process) ends the run after
      ``distributed_timeout_s``, naming that rank.
    - One run per output_dir: rank 0 locks it (``training/output_lock.py``) before writing anything; a second run
      is refused naming the holder's PID, host and start time.
    - A resume compares this run's config with the checkpoint's (``training/resume_check.py``): what would make
      the saved state meaningless (model, LoRA shape, tasks, data layout, seed, ...) is refused, naming the key;
      everything else is applied from the next step and printed, and recorded in the next checkpoint's
      ``changes``.
    - SIGTERM / SIGINT (preemption, Ctrl-C): every rank finishes its optimizer step, they save that step
      together, and the run exits with status 75 (``training/preemption.py``; ``save_on_preemption``,
      ``preemption_grace_s``).

Copy it with ``mft cp lora_finetune_distributed my_recipe.py``, edit, and run ``mft run my_recipe.py --config ...``.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mft_components.code_eval.evaluate import CodeEvaluator
from mft_components.code_eval.options import CodeEvalError
from mft_components.config import instantiate, parse, to_container
from mft_components.data.records import DataError
from mft_components.data.sampling import LoaderStateError, build_train_loader, build_valid_loader
from mft_components.data.stats import format_stats, task_stats
from mft_components.device import DiskFullError, peak_memory_gb
from mft_components.distributed import (
    collective_timeout_message,
    decided_by_rank0,
    destroy_distributed,
    end_worker,
    init_distributed,
    is_collective_timeout,
)
from mft_components.models import num_experts, prepare_batch
from mft_components.models.expert_lora import lora_target_parameters
from mft_components.models.lora import adapter_to_peft_state_dict, lora_target_names, peft_adapter_config
from mft_components.models.parallelize import gather_state_dict, report_compile
from mft_components.recipe_config.schema import LoRARecipeConfig
from mft_components.training import checkpoint as ck
from mft_components.training.evaluate import Evaluator
from mft_components.training.guards import EarlyStopping, NonFiniteGuard, NonFiniteLossError
from mft_components.training.loggers import build_metric_loggers
from mft_components.training.metrics import MetricLogger, ProgressBar, Throughput, read_log_step
from mft_components.training.output_lock import OutputDirBusy, lock_output_dir
from mft_components.training.plots import write_plots_at_end
from mft_components.training.position import TrainingPosition
from mft_components.training.preemption import PREEMPTED_EXIT_CODE, RunStopped, StopOnSignal, report_exit_status
from mft_components.training.resume_check import check_resume, run_record
from mft_components.training.state import gather_training_state, restore_training_state
from mft_components.training.summary import format_summary, summary_values

CONFIG_SCHEMA = LoRARecipeConfig


class LoRAFinetuneRecipe:
    """Multi-task LoRA / QLoRA fine-tuning. ``setup()`` builds everything, ``train()`` runs the loop of
    ``train_step()``s.

    What is trained and how it is saved live in three methods (``build_model``, ``checkpoint_weights``,
    ``load_checkpoint``); ``full_finetune_distributed`` overrides just those and keeps this loop.
    """

    METHODS = ("lora", "qlora")
    OTHER_RECIPE = "full_finetune_distributed"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.gas = cfg.gradient_accumulation_steps
        self.output_lock = None
        self.stop = StopOnSignal(save=cfg.save_on_preemption, grace_s=cfg.preemption_grace_s)

    # ------------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Build every component in dependency order. Whatever can be wrong with the data, the eval sets or the loss
        settings is found before the model loads (a mistake costs seconds, not a model load); the draws from the
        global RNG (the validation loader's iterator, LoRA's initialisation) come in the same order in every run."""
        self._setup_distributed()                   # everything after may need the rank; the seed, alike on all ranks
        resume_from = self._setup_resume_choice()   # a wrong checkpoint path costs nothing yet
        self._setup_data()                          # a bad record costs seconds, not a model load
        self._setup_loaders()                       # the run's length (for the schedule); the validation batches
        self._setup_code_evaluator()                # a bad eval set or interpreter costs no model load either
        self._setup_loss()                          # task_weights checked against the task names, still no model
        self._setup_model(resume_from)
        self._setup_optimizer()                     # over the model's trainable parameters
        self._setup_lr_scheduler()                  # over the optimizer, for the run's length
        self._setup_resume(resume_from)             # into the model, optimizer, schedule and loss built above
        self._setup_output()                        # the evaluators take over a resumed run's history

    def _setup_distributed(self) -> None:
        """The process group first: everything after it may need the rank (nccl on GPU, gloo on CPU). Then the same
        seed on every rank: LoRA's initialisation must agree across ranks."""
        self.rank, self.world_size, self.device = init_distributed(self.cfg.distributed_timeout_s)
        self.is_rank0, self.stop.rank = self.rank == 0, self.rank
        self.stop.join_group(self.cfg.distributed_timeout_s)  # the per-step stop flag's own small gloo group
        # One run per output_dir, before anything is written there; holding it, every leftover is a dead run's.
        self.output_lock = lock_output_dir(self.output_dir)
        if self.is_rank0:
            print(f"config:\n{OmegaConf.to_yaml(self.cfg, resolve=True)}", flush=True)
            ck.remove_partial_checkpoints(self.output_dir)  # leftovers of a save that was killed
        torch.manual_seed(self.cfg.seed)

    def _setup_resume_choice(self) -> Path | None:
        """Which checkpoint to continue from, settled before anything is loaded (a wrong path costs nothing); its
        files are checked against its consistency record, and resume: auto steps back past damaged ones. Then what
        this run trains with (config, model, tokenizer and data fingerprints) against what the checkpoint was
        trained with: a difference that makes its state meaningless is refused, the others are applied and printed
        (``training/resume_check.py``). Rank 0 reads the data files once; every rank gets the answer."""
        resume_from = ck.resolve_resume(self.cfg.resume, self.output_dir)
        config = to_container(self.cfg)

        def compare() -> tuple[dict, list[dict], list[str]]:
            record = run_record(config)
            if resume_from is None:
                return record, [], []
            meta = ck.read_checkpoint_meta(resume_from)
            check = check_resume(meta, config, record)
            check.raise_refusals(resume_from)
            return record, [*meta.get("changes", []), *check.changes], check.change_lines()

        self.run_record, self.changes, lines = decided_by_rank0(compare, errors=(ck.ResumeError,))
        if lines and self.is_rank0:
            print(f"resuming {resume_from} with {len(lines)} change(s):\n  " + "\n  ".join(lines), flush=True)
        return resume_from

    def _setup_data(self) -> None:
        """Tokenizer and data, validated before any model exists: a bad record costs seconds, not a model load."""
        self.tokenizer = instantiate(self.cfg.tokenizer)
        self.data = instantiate(self.cfg.data, tokenizer=self.tokenizer, seed=self.cfg.seed, rank=self.rank,
                                world_size=self.world_size)
        self.task_names = self.data.task_names
        if self.is_rank0:
            print(format_stats(task_stats(self.data)), flush=True)
            for note in self.data.notes:  # skipped files; samples dropped or truncated (WARNING above 5%)
                print(f"[mft] {note}", flush=True)

    def _setup_loaders(self) -> None:
        """This rank's training loader and the run's length (max_steps, or the epochs' steps from the sampler's
        plan), then its validation batches, read once (every evaluation is the same). Pinned host memory on CUDA:
        host-to-device copies of the batches run asynchronously."""
        cfg, pin = self.cfg, self.device.type == "cuda"
        self.train_loader = build_train_loader(self.data, micro_batch_size=cfg.micro_batch_size,
                                               gradient_accumulation_steps=self.gas, rank=self.rank,
                                               world_size=self.world_size, pin_memory=pin)
        self.position = TrainingPosition(self.train_loader, self.gas, epochs=cfg.epochs, max_steps=cfg.max_steps)
        self.valid_batches = (
            list(build_valid_loader(self.data, micro_batch_size=cfg.eval_micro_batch_size or cfg.micro_batch_size,
                                    rank=self.rank, world_size=self.world_size, pin_memory=pin))
            if self.data.valid_samples else []
        )

    def _setup_code_evaluator(self) -> None:
        """Eval sets and the sandbox, also before the model (a bad record or interpreter costs no model load), and
        what early stopping and the best checkpoint follow: the validation loss, or eval.code.select_by."""
        self.code_evaluator = CodeEvaluator.from_config(OmegaConf.select(self.cfg, "eval.code"), self.tokenizer,
                                                        self.data.chat_format)
        self.early_stopping = EarlyStopping(patience=self.cfg.early_stopping_patience,
                                            **self.code_evaluator.early_stopping_kwargs())

    def _setup_loss(self) -> None:
        """The loss, still before the model: unknown tasks in task_weights or bad CoBa settings cost no model load."""
        self.loss_fn = instantiate(self.cfg.loss)
        self.loss_fn.setup(self.task_names)
        if self.loss_fn.cross_entropy == "liger" and self.device.type != "cuda":  # else: at the first forward
            sys.exit(f"config error: loss.cross_entropy: liger runs on CUDA only (Triton kernels), this run is on "
                     f"{self.device.type}; use chunked")

    def _setup_model(self, resume_from: Path | None) -> None:
        """The model: meta-device build, LoRA / NF4 modules, FSDP2 shards, weights streamed into them."""
        method = self.cfg.model.get("method", self.METHODS[0])
        if method not in self.METHODS:
            sys.exit(f"config error: model.method is {method!r}; this recipe does {' or '.join(self.METHODS)} "
                     f"(use {self.OTHER_RECIPE} for {method})")
        self.base_model_dir = self.cfg.model.model_dir
        try:
            self.model = self.build_model(resume_from)
        except ValueError as e:  # settings this machine cannot run (an attention or kernels of another device)
            sys.exit(f"config error: {e}")
        self.model.train()
        moe = num_experts(self.model.config) is not None
        why = self.loss_fn.resolve_router_aux_loss_coef(self.model.config, moe)
        if moe and self.is_rank0:
            print(f"[mft] {why}", flush=True)

    def _setup_optimizer(self) -> None:
        """The optimizer over the trainable parameters only (the adapters); fused AdamW on CUDA (one kernel for all
        of them). The non-finite guard watches its steps."""
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" and "AdamW" in self.cfg.optimizer._component_ else {}
        self.optimizer = instantiate(self.cfg.optimizer, self.trainable, **fused)
        self.finite_guard = NonFiniteGuard(self.optimizer, self.task_names)

    def _setup_lr_scheduler(self) -> None:
        """The learning-rate schedule over the run's optimizer steps."""
        self.lr_scheduler = instantiate(self.cfg.lr_scheduler, self.optimizer,
                                        num_training_steps=self.position.total_steps)

    def _setup_resume(self, resume_from: Path | None) -> None:
        """The checkpoint's weights, optimizer, schedule, loss, early stopping, data position and RNG."""
        self.last_saved_step = None
        self.evaluator_state = self.code_evaluator_state = None
        self.evaluations_pending, self.logger_run_ids = False, {}
        if resume_from is None:
            return
        try:
            self.load_checkpoint(resume_from)
        except ck.CheckpointError as e:
            raise ck.ResumeError(str(e)) from e
        except ValueError as e:  # the checkpoint does not fit this run (model, LoRA, loss mode, tasks)
            raise ck.ResumeError(f"{resume_from}: {e}") from e

    def _setup_output(self) -> None:
        """Output for people, on rank 0, and the evaluators that write to it (with a resumed run's history)."""
        cfg, config = self.cfg, to_container(self.cfg)
        external, tensorboard = build_metric_loggers(config.get("metric_loggers")) if self.is_rank0 else ([], False)
        self.logger = MetricLogger(self.output_dir, enabled=self.is_rank0, tensorboard=cfg.tensorboard or tensorboard,
                                   start_step=self.position.step,  # rows after the checkpoint are written again
                                   external=external, config=config, run_ids=self.logger_run_ids)
        self.progress = ProgressBar(self.position.total_steps, initial=self.position.step, enabled=self.is_rank0)
        loss_tracker = EarlyStopping() if self.code_evaluator.selects else self.early_stopping
        self.evaluator = Evaluator(self.valid_batches, self.task_names, self.device, cfg.eval_every_n_steps,
                                   loss_tracker, self.logger, self.progress, self.loss_fn.ce_kwargs)
        self.evaluator.load_state_dict(self.evaluator_state)
        self.code_evaluator.attach(self.logger, self.progress, self.output_dir, self.early_stopping)
        self.code_evaluator.load_state_dict(self.code_evaluator_state)

    # -------------------------------------------------------------------------------------------------- train

    def train(self) -> None:
        """Evaluate before training, then one ``train_step`` per optimizer step until the run's last step or early
        stopping; log, evaluate and save as configured; at the end evaluate and save once more, and summarise."""
        start = time.perf_counter()
        self.stop.start_training()  # from now on SIGTERM / SIGINT stop the run after the step in progress
        self.evaluate_before_training()
        self.stop_if_signalled()
        throughput = Throughput(self.device)
        first_step = self.position.step + 1
        for host_batches in self.position.steps(stop=lambda: self.early_stopping.should_stop):
            grad_norm, lr = self.train_step(host_batches)
            self.position.advance()
            if self.position.step == first_step:  # did compile hold? the first step's graphs and graph breaks
                report_compile(self.model, show=self.is_rank0)
            throughput.add_step(host_batches)
            if self.log_due():
                self.log_step(grad_norm, lr, throughput)
            self.stop_if_signalled()  # every rank at the same step: save it and stop
            with throughput.paused():  # evaluation and checkpoints are not training time
                if self.evaluate_and_save():
                    break
        self.finish(start)

    def train_step(self, host_batches: list[dict]) -> tuple[torch.Tensor, float]:
        """One optimizer step over this rank's micro-batches (gradient accumulation).

        Args:
            host_batches: the step's ``gradient_accumulation_steps`` micro-batches, still on the host.

        Returns:
            (the gradient norm before clipping, left on the device; the learning rate the step used).
        """
        self.accumulate_gradients(host_batches)
        return self.optimizer_step(host_batches)

    def accumulate_gradients(self, host_batches: list[dict]) -> None:
        """Forward, loss and backward of this rank's micro-batches: the step's gradients, accumulated."""
        # Global per-task counts first (counted on the host, one all-reduce), then the micro-batches go to the
        # device with what their forward needs from the host, and each adds its exact share of the step's loss.
        counts = self.loss_fn.step_counts(host_batches, device=self.device)
        micro_batches = [prepare_batch(b, self.device, self.model.config) for b in host_batches]
        for batch in micro_batches:
            token_losses, aux_loss = self.model(batch, **self.loss_fn.ce_kwargs)
            share = self.loss_fn(token_losses, batch, counts, aux_loss=aux_loss)
            (share * self.world_size).backward()  # FSDP averages gradients over ranks: undo it

    def optimizer_step(self, host_batches: list[dict]) -> tuple[torch.Tensor, float]:
        """Clip, check finiteness, step the optimizer and the schedule; returns (grad norm, the step's lr)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.clip_grad_norm or float("inf"))
        # Before the optimizer step, so the weights (and every checkpoint) stay finite: a finite loss can still come
        # with an inf gradient, which clipping would turn into NaN weights.
        self.finite_guard.update(self.position.step + 1, self.loss_fn.step_loss(), grad_norm,
                                 [b["task_ids"] for b in host_batches])
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return grad_norm, lr

    def evaluate_before_training(self) -> None:
        """Per-task validation losses (and pass@k) before any update: what every later evaluation is compared with,
        and what CoBa normalises each task's validation curve by. A resumed run has them from its checkpoint; when
        that checkpoint was saved on a signal, before its step's evaluations, they run now, as they would have."""
        if self.position.step == 0 and self.evaluator.valid_batches:
            self.evaluator.run(self.model, 0, track=False)
            self.loss_fn.set_coba_reference(self.evaluator.reference.task_loss)
        if self.position.step == 0 and self.code_evaluator.enabled:
            self.code_evaluator.run(self.model, 0, track=False)
        if self.evaluations_pending:
            self.evaluations_pending, self.last_saved_step = False, None  # its checkpoint lacks them: save again
            self.evaluate_and_save()

    def evaluate_and_save(self) -> bool:
        """What follows a step: its evaluations, then a checkpoint when the best improved or one is due. Returns
        True when early stopping ends the run."""
        improved = self.evaluate_step()
        if self.early_stopping.should_stop:
            return True
        if improved or self.save_due():
            self.save_checkpoint()
        return False

    def stop_if_signalled(self) -> None:
        """When any rank got SIGTERM / SIGINT (collective: every rank learns it at the same step), save this step
        (its evaluations are left to the resumed run) and stop.

        Raises:
            RunStopped: after saving, with the message for people and the exit status.
        """
        signum = self.stop.agreed()
        if signum is None:
            return
        step, name = self.position.step, signal.Signals(signum).name
        if step == 0:
            raise RunStopped(f"stopped by {name} before the first step: nothing to save")
        if self.last_saved_step != step:
            self.save_checkpoint(evaluations_pending=True)
        raise RunStopped(f"stopped by {name} after step {step}: {self.output_dir / f'step_{step}'} holds it; run the "
                         f"same command with resume: auto to continue (exit status {PREEMPTED_EXIT_CODE})")

    def log_due(self) -> bool:
        step = self.position.step
        return step % self.cfg.log_every_n_steps == 0 or step == self.position.total_steps

    def log_step(self, grad_norm: torch.Tensor, lr: float, throughput: Throughput) -> None:
        """The step's metrics (collective: every rank reduces them, rank 0 writes). Only log steps read values back
        from the device (loss, per-task losses, norm, token counts), and stop a run that went non-finite."""
        metrics = read_log_step(self.loss_fn, grad_norm, self.finite_guard, throughput)  # one all-reduce, one copy
        self.logger.log("train", self.position.step, {
            **metrics, "lr": lr, "epoch": self.position.epoch, "peak_memory_gb": peak_memory_gb(self.device),
        })
        self.progress.update(self.position.step, metrics["loss"], lr, metrics["tokens_per_s"])

    def evaluate_step(self) -> bool:
        """The evaluations due after this step (collective): CoBa's sampled validation losses, the validation loss,
        the code evaluation. Returns True when what selects the best checkpoint improved."""
        step = self.position.step
        self.evaluator.update_coba(self.model, self.loss_fn, step)
        loss_due = self.evaluator.due(step, self.position.epoch_end)
        improved = loss_due and self.evaluator.run(self.model, step)
        code_due = self.code_evaluator.due(step, loss_due)
        code_improved = code_due and self.code_evaluator.run(self.model, step)
        return code_improved if self.code_evaluator.selects else improved

    def save_due(self) -> bool:
        return bool(self.cfg.save_every_n_steps) and self.position.step % self.cfg.save_every_n_steps == 0

    def finish(self, start: float) -> None:
        """The end: evaluate if the last step was not evaluated, then the final checkpoint (again, when a periodic
        save of this step came before these evaluations: the checkpoint carries them and the best step), and the
        summary of the run."""
        stop_reason = self.stop_reason()
        self.finite_guard.check()
        step, evaluated_now = self.position.step, False
        if not self.evaluator.evaluated(step):
            self.evaluator.run(self.model, step)
            evaluated_now = True
        if not self.code_evaluator.evaluated(step):
            self.code_evaluator.run(self.model, step)
            evaluated_now = True
        if evaluated_now or self.last_saved_step != step:
            self.save_checkpoint()
        self.progress.close()
        if self.is_rank0:
            checkpoints = dict(ck.list_checkpoints(self.output_dir))
            summary = dict(steps=step, seconds=time.perf_counter() - start, stop_reason=stop_reason,
                           early_stopping=self.early_stopping,
                           # the best step's per-task values: its losses, or what select_by follows
                           best_eval=None if self.code_evaluator.selects else self.evaluator.best,
                           best_task_values=self.code_evaluator.best_task_values())
            print(format_summary(**summary, checkpoints=list(checkpoints.values()), output_dir=self.output_dir),
                  flush=True)
            best = checkpoints.get(self.early_stopping.best_step, checkpoints.get(step))
            self.logger.summary(summary_values(**summary), artifact_dir=best)  # W&B / MLflow (artifact if asked)
            if self.cfg.plots:  # output_dir/plots/*.png, as `mft plot` draws them
                print(write_plots_at_end(self.output_dir), flush=True)

    def stop_reason(self) -> str:
        stopping = self.early_stopping
        if stopping.should_stop:
            return (f"early stopping: {stopping.bad_evals} evaluations without a better {stopping.metric} than step "
                    f"{stopping.best_step}'s")
        return f"reached {self.position.total_steps} steps"

    # ------------------------------------------------------------------------------------------- checkpoints

    def build_model(self, resume_from: Path | None):
        """The base model with LoRA (or NF4 + LoRA); a resumed adapter is loaded later by ``load_checkpoint``."""
        return instantiate(self.cfg.model, dtype=self.cfg.dtype, device=self.device, distributed=self.world_size > 1)

    def checkpoint_weights(self) -> dict:
        """The adapter in PEFT's key names and config (collective: every rank calls it; rank 0 gets the tensors)."""
        adapter = gather_state_dict(self.model, adapter_only=True)
        lora = self.model.lora_config
        return {
            "weights": adapter_to_peft_state_dict(adapter),
            "adapter_config": peft_adapter_config(self.base_model_dir, lora["rank"], lora["alpha"], lora["dropout"],
                                                  lora_target_names(self.model), lora.get("use_rslora", False),
                                                  lora_target_parameters(self.model)),
        }

    def save_checkpoint(self, evaluations_pending: bool = False) -> None:
        """Weights + recipe state into output_dir/step_N; collective, rank 0 writes. Never after a non-finite
        step (``NonFiniteGuard.check`` raises first). ``evaluations_pending``: saved on a signal before the step's
        evaluations, which the resumed run then runs first."""
        self.finite_guard.check()
        weights = self.checkpoint_weights()
        position = self.position
        state = gather_training_state(
            self.model, self.optimizer, lr_scheduler=self.lr_scheduler, loss_fn=self.loss_fn,
            early_stopping=self.early_stopping, train_loader=self.train_loader,
            step=position.step, epoch=position.epoch, step_in_epoch=position.step_in_epoch,
        )

        def write() -> None:  # rank 0 only
            state["evaluator"] = self.evaluator.state_dict()
            state["code_evaluator"] = self.code_evaluator.state_dict()
            state["evaluations_pending"] = evaluations_pending
            state["metric_loggers"] = self.logger.run_ids()  # a resume continues these W&B / MLflow runs
            meta = ck.checkpoint_meta(self.model, self.data, self.tokenizer, self.evaluator.last,
                                      to_container(self.cfg), base_model_dir=self.base_model_dir)
            # What it was trained with, where it is, and what a resume changed: what the next resume compares.
            record = {"trained_with": self.run_record, "changes": self.changes, "position": {
                "epoch": position.epoch, "step_in_epoch": position.step_in_epoch, "epoch_complete": position.epoch_end}}
            path = ck.save_checkpoint(self.output_dir, position.step, **weights, recipe_state=state,
                                      meta={**meta, **self.code_evaluator.checkpoint_meta(), **record})
            best = self.early_stopping.best_step
            ck.prune_checkpoints(self.output_dir, self.cfg.saving_limit, keep=(best,) if best else ())
            self.progress.write(f"saved {path}")

        # The other ranks wait in step (a short all-reduce each second), not in one barrier: writing and hashing a
        # large checkpoint may take longer than distributed_timeout_s, which is meant for a rank that stopped.
        # A full disk stops every rank with rank 0's message (DiskFullError), not a traceback and a timeout.
        decided_by_rank0(write, errors=(DiskFullError,))
        self.last_saved_step = position.step

    def load_checkpoint(self, path: Path) -> None:
        """Restore the adapter, then the recipe state."""
        ck.load_adapter(self.model, path)
        self.load_recipe_state(path)

    def load_recipe_state(self, path: Path) -> None:
        """Optimizer, schedule, loss, early stopping, data position (``torch.load(weights_only=True)``)."""
        state = ck.load_recipe_state(path)
        rank_state = restore_training_state(
            state, self.model, self.optimizer, lr_scheduler=self.lr_scheduler, loss_fn=self.loss_fn,
            early_stopping=self.early_stopping, rank=self.rank, world_size=self.world_size,
        )
        self.position.restore(state["step"], state["epoch"], state["step_in_epoch"], rank_state)
        self.evaluator_state = state.get("evaluator")  # restored once the evaluators exist (_setup_output)
        self.code_evaluator_state = state.get("code_evaluator")
        self.evaluations_pending = bool(state.get("evaluations_pending", False))
        self.logger_run_ids = state.get("metric_loggers") or {}
        self.last_saved_step = state["step"]
        if self.is_rank0:
            print(f"resumed from {path} at step {state['step']}", flush=True)

    def cleanup(self, ok: bool = True) -> None:
        self.logger.close(ok)
        self.progress.close()
        self.code_evaluator.close()
        destroy_distributed()


def run(recipe: LoRAFinetuneRecipe) -> None:
    """Set up, train, clean up. Bad data, an unusable checkpoint, a non-finite loss, a rank that stopped answering
    and another run in output_dir end the run with a message and exit status 1; SIGTERM / SIGINT with a checkpoint
    of the step it stopped at and exit status 75. output_dir's lock is released however it ends."""
    recipe.stop.install()  # a signal from here on ends the run in order (and SIGINT without a traceback)
    try:
        _setup_and_train(recipe)
    except RunStopped as e:
        if recipe.is_rank0:
            print(e, file=sys.stderr, flush=True)
            report_exit_status(e.exit_code)
        recipe.cleanup(ok=False)
        end_worker(e.exit_code)  # under torchrun the worker ends here
        sys.exit(e.exit_code)
    finally:
        recipe.stop.uninstall()
        if recipe.output_lock is not None:
            recipe.output_lock.release()


def _setup_and_train(recipe: LoRAFinetuneRecipe) -> None:
    try:
        recipe.setup()
    except OutputDirBusy as e:  # every rank says so
        sys.exit(f"error: {e}")
    except DataError as e:  # reported before any model was built
        sys.exit(f"data error:\n{e}")
    except CodeEvalError as e:  # eval sets and the sandbox: also before the model
        sys.exit(f"eval.code error:\n{e}")
    except ck.ResumeError as e:
        sys.exit(f"resume error: {e}")
    except RuntimeError as e:
        _exit_if_collective_timeout(recipe, e)
        raise
    try:
        recipe.train()
    except NonFiniteLossError as e:
        if recipe.is_rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        recipe.cleanup(ok=False)
        sys.exit(1)
    except LoaderStateError as e:  # a resume with another global batch, found when the loader restarts
        sys.exit(f"resume error: {e}")
    except DiskFullError as e:  # a checkpoint did not fit; the ones before it are whole
        if recipe.is_rank0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        recipe.cleanup()
        sys.exit(1)
    except RuntimeError as e:
        _exit_if_collective_timeout(recipe, e)
        raise
    recipe.cleanup()


def _exit_if_collective_timeout(recipe: LoRAFinetuneRecipe, error: RuntimeError) -> None:
    # Every rank that timed out says so (the stuck one cannot): no cleanup, its collectives would wait again.
    if is_collective_timeout(error):
        sys.exit(f"error: {collective_timeout_message(error, recipe.cfg.distributed_timeout_s)}")


@parse(schema=CONFIG_SCHEMA)
def recipe_main(cfg: DictConfig) -> None:
    run(LoRAFinetuneRecipe(cfg))


if __name__ == "__main__":
    recipe_main()
    end_worker()
