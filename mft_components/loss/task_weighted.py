"""MFTCoder's multi-task loss modes, reduced exactly over the global batch of one optimiser step.

    per-token CE [N] of each micro-batch (``cross_entropy.py``)
        --TaskWeightedLoss--> per-sample / per-task reduction over the GLOBAL batch --> scalar share

``step_counts`` counts loss tokens and samples per task over the step's micro-batches on every rank (one
all-reduce); each micro-batch then adds its exact share, so the step loss and its gradients do not depend on how
the global batch is split into ranks x micro-batches. ``loss.mode: coba`` takes its task weights from ``coba.py``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mft_components.device import to_device
from mft_components.distributed import all_reduce_sum, is_distributed
from mft_components.loss.coba import CoBa
from mft_components.loss.cross_entropy import IGNORE_INDEX, LOSS_INDEX, check_cross_entropy_options

__all__ = ["LOSS_MODE_ALIASES", "LOSS_MODES", "StepCounts", "task_loss_sums", "TaskWeightedLoss"]

# MFTCoder's `weighted_loss_mode` names -> ours.
LOSS_MODE_ALIASES = {"case1": "token", "case2": "sample", "case3": "task", "case4": "task_sample"}
LOSS_MODES = ("token", "sample", "task", "task_sample", "coba")


@dataclass
class StepCounts:
    """Loss tokens and samples per task over one optimiser step's global batch (all micro-batches, all ranks).

    Attributes:
        tokens (torch.Tensor): int64 ``[K]`` loss tokens (labels != -100) per task.
        samples (torch.Tensor): int64 ``[K]`` samples with at least one loss token, per task.
        micro_batches (int): micro-batches in the step summed over ranks (to average an auxiliary loss).
    """

    tokens: torch.Tensor
    samples: torch.Tensor
    micro_batches: int


def _loss_token_ids(batch: dict, num_tasks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(task ids, sample ids) of the loss tokens of ``batch``, in the row-major order of ``labels != -100``.

    A prepared batch (``LOSS_INDEX`` present, validated on the host by ``step_counts``) is gathered by index and
    not validated again: reading values back from a GPU would make the host wait.
    """
    index = batch.get(LOSS_INDEX)
    if index is not None:
        return batch["task_ids"].reshape(-1)[index], batch["sample_ids"].reshape(-1)[index]
    mask = batch["labels"] != IGNORE_INDEX
    task_ids = batch["task_ids"][mask]
    sample_ids = batch["sample_ids"][mask]
    if task_ids.numel():
        if int(task_ids.min()) < 0 or int(sample_ids.min()) < 0:
            raise ValueError(
                "TaskWeightedLoss: a token with a label (labels != -100) has task_ids or sample_ids -1; "
                "the collator must give every loss token its sample's task and sample index"
            )
        if num_tasks is not None and int(task_ids.max()) >= num_tasks:
            raise ValueError(
                f"TaskWeightedLoss: batch has task id {int(task_ids.max())} but setup() was given "
                f"{num_tasks} task names"
            )
    return task_ids, sample_ids


def task_loss_sums(token_losses: torch.Tensor, batch: dict, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task sum of token losses and loss-token count of one micro-batch (e.g. for validation).

    Args:
        token_losses (torch.Tensor): ``[N]`` per-token losses in the order of ``labels != -100``.
        batch (dict): the micro-batch (``labels``, ``task_ids``, ``sample_ids``).
        num_tasks (int): K.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: float64 ``[K]`` loss sums and int64 ``[K]`` token counts.
    """
    task_ids, _ = _loss_token_ids(batch, num_tasks)
    task_ids = task_ids.to(token_losses.device)
    sums = torch.zeros(num_tasks, dtype=torch.float64, device=token_losses.device)
    sums.index_add_(0, task_ids, token_losses.detach().double())
    return sums, _count(task_ids, num_tasks)


def _count(ids: torch.Tensor, size: int) -> torch.Tensor:
    """int64 ``[size]`` occurrences of each id (``bincount`` with a size known on the host: on a GPU, bincount
    reads the largest id back first)."""
    return torch.zeros(size, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


class TaskWeightedLoss:
    """MFTCoder's multi-task loss modes, exact over an optimiser step's global batch, plus CoBa and MoE aux loss.

    With per-token losses l_i, tasks t (weight w_t), samples s (m_s loss tokens) and, over the GLOBAL batch of the
    step, n_t loss tokens and S_t samples of task t, N = sum n_t, S = sum S_t, P = tasks with n_t > 0 and
    W = sum_{t in P} w_t, the step loss is::

        token        (case1)  L = sum_i l_i / N
        sample       (case2)  L = 1/S * sum_s (sum_{i in s} l_i / m_s)
        task         (case3)  L = sum_{t in P} w_t * (sum_{i in t} l_i / n_t) / W
        task_sample  (case4)  L = sum_{t in P} w_t * (1/S_t * sum_{s in t} sum_{i in s} l_i / m_s) / W
        coba                  as task, with w from convergence balancing (``update_coba``)

    Every mode is a per-token weighted sum L = sum_i c_i * l_i, so each micro-batch contributes exactly
    sum_{i in mb} c_i * l_i once the global counts are known: call ``step_counts`` on the step's micro-batches
    first (one all-reduce), then ``__call__`` per micro-batch. A task absent from the step is not in P.
    Unlike MFTCoder, which reduces per micro-batch, the result and its gradient do not depend on how the
    global batch is split into ranks x micro-batches.

    Usage in a recipe::

        counts = loss_fn.step_counts(micro_batches)
        for mb in micro_batches:
            token_losses, aux = model(mb, **loss_fn.ce_kwargs)
            (loss_fn(token_losses, mb, counts, aux_loss=aux) * world_size).backward()  # FSDP averages grads
        metrics = loss_fn.step_metrics()

    Args:
        mode (str): token | sample | task | task_sample | coba, or MFTCoder's case1..case4.
        task_weights (dict[str, float] | list[float] | None): per-task w_t (task, task_sample modes); default 1.
        chunk_size (int): tokens per chunk of the chunked cross entropy (passed to the model's forward).
        projection_dtype (str): ``model`` (project onto the vocabulary in the model's dtype, log-softmax in
            float32) or ``float32`` (upcast first: exact logits, slower for bf16 models).
        cross_entropy (str): ``chunked`` (mft's, any device) or ``liger`` (liger-kernel's fused linear cross
            entropy, CUDA, ``pip install 'mft[gpu]'``; off by default until measured faster on a GPU).
        coba_warmup_steps (int): steps with uniform weights before CoBa starts adapting.
        coba_history_length (int): window (in CoBa updates) of validation losses and of slopes.
        coba_tau (float): temperature of the divergence factor.
        coba_update_interval (int): optimiser steps between CoBa updates (see ``coba_due``).
        coba_sample_valid_num (int): validation micro-batches the recipe evaluates per CoBa update.
        router_aux_loss_coef (float | None): coefficient of the MoE load-balancing loss; None (the default) = the
            model config's ``router_aux_loss_coef`` for a MoE model (as transformers and MFTCoder train it, set by
            ``resolve_router_aux_loss_coef`` once the model is known), 0 to turn it off.

    Raises:
        ValueError: on an unknown mode, bad weights or hyperparameters (messages name the ``loss.*`` key).
    """

    def __init__(
        self,
        mode: str = "task",
        task_weights: dict[str, float] | list[float] | None = None,
        chunk_size: int = 1024,
        projection_dtype: str = "model",
        cross_entropy: str = "chunked",
        coba_warmup_steps: int = 100,
        coba_history_length: int = 200,
        coba_tau: float = 5,
        coba_update_interval: int = 1,
        coba_sample_valid_num: int = 1,
        router_aux_loss_coef: float | None = None,
    ):
        resolved = LOSS_MODE_ALIASES.get(str(mode).lower(), str(mode).lower())
        if resolved not in LOSS_MODES:
            raise ValueError(
                f"loss.mode: expected one of {', '.join(LOSS_MODES)} (or MFTCoder's case1..case4), got {mode!r}"
            )
        if resolved == "coba" and task_weights is not None:
            raise ValueError("loss.task_weights: not used with loss.mode=coba (CoBa computes the weights); remove it")
        check_cross_entropy_options(chunk_size, projection_dtype, cross_entropy, config=True)
        if cross_entropy == "liger" and importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("loss.cross_entropy: liger needs the liger-kernel package (pip install 'mft[gpu]'); "
                             "or use chunked")
        for key, value in (
            ("coba_warmup_steps", coba_warmup_steps),
            ("coba_history_length", coba_history_length - 1),
            ("coba_update_interval", coba_update_interval - 1),
            ("coba_sample_valid_num", coba_sample_valid_num - 1),
        ):
            if int(value) < 0:
                raise ValueError(f"loss.{key}: expected a {'non-negative' if key == 'coba_warmup_steps' else 'positive'} int")
        if coba_tau <= 0:
            raise ValueError(f"loss.coba_tau: expected a positive number, got {coba_tau}")
        self.mode = resolved
        self.chunk_size = int(chunk_size)
        self.projection_dtype = projection_dtype
        self.cross_entropy = cross_entropy
        if router_aux_loss_coef is not None and not (isinstance(router_aux_loss_coef, (int, float))
                                                     and not isinstance(router_aux_loss_coef, bool)
                                                     and router_aux_loss_coef >= 0):
            raise ValueError(f"loss.router_aux_loss_coef: expected a non-negative number (or null: the model "
                             f"config's), got {router_aux_loss_coef!r}")
        self.router_aux_loss_coef = None if router_aux_loss_coef is None else float(router_aux_loss_coef)
        self.coba_update_interval = int(coba_update_interval)
        self.coba_sample_valid_num = int(coba_sample_valid_num)
        self._user_weights = task_weights
        self.coba = CoBa(coba_warmup_steps, coba_history_length, coba_tau) if resolved == "coba" else None
        self.task_names: list[str] | None = None
        self._weights: list[float] | None = None
        self._reset_metrics()

    @property
    def ce_kwargs(self) -> dict:
        """Keyword arguments of ``MFTModel.forward`` for the chunked cross entropy (training and evaluation)."""
        return {"chunk_size": self.chunk_size, "projection_dtype": self.projection_dtype,
                "cross_entropy": self.cross_entropy}

    # -- setup ------------------------------------------------------------------------------------------------

    def resolve_router_aux_loss_coef(self, model_config, moe: bool) -> str:
        """Fix the load-balancing coefficient once the model is known: an unset one becomes the MoE model
        config's ``router_aux_loss_coef`` (0 for a dense model). Returns what was chosen and why, for the log."""
        if self.router_aux_loss_coef is not None:
            return f"loss.router_aux_loss_coef: {self.router_aux_loss_coef:g} (from the config)"
        self.router_aux_loss_coef = float(getattr(model_config, "router_aux_loss_coef", 0.0) or 0.0) if moe else 0.0
        return (f"loss.router_aux_loss_coef: {self.router_aux_loss_coef:g} (the model config's router_aux_loss_coef; "
                f"set loss.router_aux_loss_coef: 0 to train without the load-balancing loss)")

    def setup(self, task_names: list[str]) -> None:
        """Bind the task list (``MFTData.task_names``) and resolve ``task_weights`` against it.

        Raises:
            ValueError: when ``task_weights`` names an unknown task, has the wrong length, or is negative / all 0.
        """
        self.task_names = list(task_names)
        k = len(self.task_names)
        if k == 0:
            raise ValueError("TaskWeightedLoss.setup: task_names is empty")
        w = self._user_weights
        if w is None:
            weights = [1.0] * k
        elif isinstance(w, Mapping):
            unknown = sorted(set(w) - set(self.task_names))
            if unknown:
                raise ValueError(
                    f"loss.task_weights: unknown task(s) {unknown}; the tasks are {self.task_names}"
                )
            weights = [float(w.get(name, 1.0)) for name in self.task_names]
        else:
            weights = [float(x) for x in w]
            if len(weights) != k:
                raise ValueError(
                    f"loss.task_weights: a list needs one weight per task ({k}: {self.task_names}), got {len(weights)}"
                )
        if any(x < 0 for x in weights) or sum(weights) <= 0:
            raise ValueError(f"loss.task_weights: expected non-negative weights, not all 0, got "
                             f"{dict(zip(self.task_names, weights))}")
        self._weights = weights
        if self.coba is not None:
            self.coba.setup(k)
        self._reset_metrics()

    def _require_setup(self) -> int:
        if self.task_names is None:
            raise RuntimeError("TaskWeightedLoss: call setup(task_names) before using the loss")
        return len(self.task_names)

    def task_weights(self) -> dict[str, float]:
        """Current w_t per task: CoBa's weights (sum 1) in coba mode, else the configured ones (default 1)."""
        self._require_setup()
        weights = self.coba.weights if self.coba is not None else self._weights
        return dict(zip(self.task_names, (float(x) for x in weights)))

    # -- the step ---------------------------------------------------------------------------------------------

    def step_counts(self, micro_batches: list[dict], group=None, device: torch.device | None = None) -> StepCounts:
        """Count loss tokens and samples per task over the step's micro-batches, summed over ranks.

        Also starts a new step for the per-task metrics. Every rank must call it (it all-reduces once). Pass the
        micro-batches while they are still on the host (the recipe does): counting and validating there costs
        the device nothing, and only the ``2K`` counts travel, without the host waiting for them.

        Args:
            micro_batches (list[dict]): this rank's micro-batches of the optimiser step.
            group: process group for the all-reduce (default: the world).
            device: where the counts are reduced and used (the model's device; default: the batches').

        Returns:
            StepCounts: global counts; ``micro_batches`` is this rank's number times the group's size (every
            rank runs the same number of micro-batches per step: FSDP's collectives require it).
        """
        k = self._require_setup()
        here = micro_batches[0]["labels"].device if micro_batches else torch.device("cpu")
        counts = torch.zeros(2 * k, dtype=torch.int64, device=here)
        for batch in micro_batches:
            task_ids, sample_ids = _loss_token_ids({key: v for key, v in batch.items() if key != LOSS_INDEX}, k)
            counts[:k] += _count(task_ids, k)
            # Sample ids are unique within a micro-batch and below its B*T: map each sample to its task.
            sample_task = torch.full((batch["sample_ids"].numel(),), -1, dtype=torch.int64, device=here)
            sample_task[sample_ids] = task_ids
            counts[k:] += _count(sample_task[sample_task >= 0], k)
        counts = to_device(counts, device or here)
        all_reduce_sum(counts, group)
        self._reset_metrics(counts.device)
        self._step_tokens = counts[:k].clone()
        world = dist.get_world_size(group) if is_distributed() else 1
        return StepCounts(tokens=counts[:k], samples=counts[k:], micro_batches=len(micro_batches) * world)

    def token_coefficients(self, batch: dict, counts: StepCounts) -> torch.Tensor:
        """c_i of the class formula for this micro-batch's loss tokens (float32 ``[N]``, order of labels != -100)."""
        # Written without reading device values back (no .item(), no data-dependent branch or size): on a GPU
        # the host keeps queueing work while the device computes.
        k = self._require_setup()
        task_ids, sample_ids = _loss_token_ids(batch, k)
        device = task_ids.device
        n_tok = counts.tokens.to(device=device, dtype=torch.float64)
        if task_ids.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=device)
        # m_s: loss tokens of each token's sample (a sample never straddles micro-batches, so this is exact).
        m_s = _count(sample_ids, batch["sample_ids"].numel())[sample_ids].double()
        if self.mode == "token":
            coef = torch.ones_like(m_s) / n_tok.sum()
        elif self.mode == "sample":
            coef = 1.0 / (counts.samples.to(device=device, dtype=torch.float64).sum() * m_s)
        else:
            w = to_device(torch.tensor(self.coba.weights if self.coba is not None else self._weights,
                                       dtype=torch.float64), device)
            present = n_tok > 0
            w_present = torch.where(present, w, torch.zeros_like(w))
            # every task present in the step may have weight 0: then every coefficient is 0 (not 0 / 0)
            total_w = w_present.sum().clamp(min=torch.finfo(torch.float64).tiny)
            if self.mode == "task_sample":
                per_task = w_present / (counts.samples.to(device=device, dtype=torch.float64).clamp(min=1) * total_w)
                coef = per_task[task_ids] / m_s
            else:  # task, coba
                per_task = w_present / (n_tok.clamp(min=1) * total_w)
                coef = per_task[task_ids]
        return coef.float()

    def __call__(
        self,
        token_losses: torch.Tensor,
        batch: dict,
        counts: StepCounts,
        aux_loss: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This micro-batch's exact share of the global step loss (shares summed over micro-batches and ranks = L).

        Args:
            token_losses (torch.Tensor): ``[N]`` per-token losses of ``chunked_cross_entropy`` (order of
                ``labels != -100`` in ``batch``).
            batch (dict): the micro-batch.
            counts (StepCounts): from ``step_counts`` for this step.
            aux_loss (torch.Tensor | None): the micro-batch's MoE load-balancing loss; adds
                ``router_aux_loss_coef * aux_loss / counts.micro_batches`` (the mean over the step's micro-batches).

        Returns:
            torch.Tensor: scalar float32 share (backprop ``share * world_size`` under FSDP's gradient averaging).

        Raises:
            ValueError: when ``token_losses`` does not have one entry per loss token of ``batch``.
        """
        k = self._require_setup()
        index = batch.get(LOSS_INDEX)
        n_loss = index.numel() if index is not None else int((batch["labels"] != IGNORE_INDEX).sum())
        if token_losses.shape != (n_loss,):
            raise ValueError(
                f"TaskWeightedLoss: token_losses has shape {tuple(token_losses.shape)} but the batch has {n_loss} "
                "tokens with labels != -100; pass chunked_cross_entropy's output for this batch"
            )
        coef = self.token_coefficients(batch, counts).to(token_losses.device)
        share = (token_losses.float() * coef).sum()
        sums, _ = task_loss_sums(token_losses, batch, k)
        # Accumulated where the losses are (moved only if step_counts ran elsewhere): nothing is read back here.
        self._task_loss_sum = self._task_loss_sum.to(sums.device) + sums
        self._loss_sum = self._loss_sum.to(sums.device) + share.detach().double()
        if aux_loss is not None and self.router_aux_loss_coef:
            aux_share = self.router_aux_loss_coef * aux_loss.float() / max(counts.micro_batches, 1)
            self._aux_sum = self._aux_sum.to(sums.device) + aux_share.detach().double()
            share = share + aux_share
        return share

    # -- metrics ----------------------------------------------------------------------------------------------

    def _reset_metrics(self, device: torch.device | None = None) -> None:
        k = len(self.task_names) if self.task_names else 0
        self._task_loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._aux_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._step_tokens = torch.zeros(k, dtype=torch.int64, device=device)

    def step_loss(self) -> torch.Tensor:
        """This rank's part of the step loss so far (auxiliary loss included), a float64 scalar on the device,
        not reduced over ranks and not read back: for a device-side finiteness check every step."""
        return self._loss_sum + self._aux_sum.to(self._loss_sum.device)

    def step_sums(self) -> torch.Tensor:
        """This rank's sums of the step so far, float64 ``[2 + K]`` on the device, not reduced and not read back:
        the weighted loss, the auxiliary loss and each task's loss sum (``step_metrics`` reduces them)."""
        self._require_setup()
        device = self._task_loss_sum.device  # where the step's losses were summed; _aux_sum may still be on the CPU
        return torch.cat([t.reshape(-1).to(device) for t in (self._loss_sum, self._aux_sum, self._task_loss_sum)])

    def step_token_counts(self) -> torch.Tensor:
        """Loss tokens per task of the step, float64 ``[K]``, already global (``step_counts`` reduced them)."""
        return self._step_tokens.to(self._task_loss_sum.device, torch.float64)

    def step_metrics(self, group=None, values: list[float] | None = None) -> dict[str, float]:
        """Metrics of the step since ``step_counts``, reduced over ranks (every rank must call it).

        Args:
            group: the process group of the reduction.
            values: the step's values already reduced and read back (``step_sums`` summed over ranks, then
                ``step_token_counts``), when the caller read them with others in one copy; by default this
                reduces ``step_sums`` and reads both back in one device-to-host copy.

        Returns:
            dict[str, float]: ``loss`` (the weighted step loss L), ``aux_loss`` (coef-scaled, when used) and per
            task ``loss/<task>`` (token-mean training CE; only tasks present in the step), ``tokens/<task>``
            (loss tokens) and ``weight/<task>`` (current w_t).
        """
        k = self._require_setup()
        if values is None:
            packed = all_reduce_sum(self.step_sums(), group)
            values = torch.cat([packed, self.step_token_counts()]).tolist()
        out = {"loss": float(values[0])}
        if self.router_aux_loss_coef:
            out["aux_loss"] = float(values[1])
        for name, loss_sum, n in zip(self.task_names, values[2:2 + k], values[2 + k:2 + 2 * k]):
            if n > 0:
                out[f"loss/{name}"] = loss_sum / n
            out[f"tokens/{name}"] = int(n)
        for name, w in self.task_weights().items():
            out[f"weight/{name}"] = w
        return out

    # -- CoBa -------------------------------------------------------------------------------------------------

    def coba_due(self, step: int) -> bool:
        """Whether the recipe should evaluate validation losses and call ``update_coba`` at ``step``."""
        return self.coba is not None and step % self.coba_update_interval == 0

    def update_coba(self, step: int, valid_losses_per_task) -> dict[str, float]:
        """Feed CoBa the per-task validation losses at ``step`` (identical on every rank) and update the weights.

        Args:
            step (int): optimiser steps completed.
            valid_losses_per_task (dict[str, float] | list[float] | torch.Tensor): per-task token-mean validation
                loss, already reduced over ranks; NaN or a missing key for a task without validation tokens.

        Returns:
            dict[str, float]: the new weights.

        Raises:
            RuntimeError: when the mode is not coba.
        """
        k = self._require_setup()
        if self.coba is None:
            raise RuntimeError(f"TaskWeightedLoss.update_coba: loss.mode is {self.mode!r}, not 'coba'")
        if isinstance(valid_losses_per_task, Mapping):
            losses = [float(valid_losses_per_task.get(name, math.nan)) for name in self.task_names]
        else:
            losses = [float(x) for x in (valid_losses_per_task.tolist() if torch.is_tensor(valid_losses_per_task)
                                         else valid_losses_per_task)]
        if len(losses) != k:
            raise ValueError(f"update_coba: expected {k} validation losses ({self.task_names}), got {len(losses)}")
        self.coba.update(step, losses)
        return self.task_weights()

    def set_coba_reference(self, valid_losses_per_task: Mapping[str, float]) -> None:
        """Give CoBa the per-task losses on the whole validation split before training, the reference its
        curves are normalised by (as MFTCoder does); without it the first sampled validation loss is used.
        No-op unless the mode is coba."""
        if self.coba is not None:
            self.coba.set_reference([float(valid_losses_per_task.get(name, math.nan)) for name in self.task_names])

    def state_dict(self) -> dict:
        """Plain Python state (CoBa history and weights); safe for ``torch.load(weights_only=True)``."""
        return {"mode": self.mode, "coba": self.coba.state_dict() if self.coba is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output (after ``setup``).

        Raises:
            ValueError: when the saved mode differs from the configured one.
        """
        if state.get("mode") != self.mode:
            raise ValueError(
                f"TaskWeightedLoss.load_state_dict: checkpoint has loss.mode={state.get('mode')!r}, "
                f"config has {self.mode!r}"
            )
        if self.coba is not None:
            self.coba.load_state_dict(state["coba"])
