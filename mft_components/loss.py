"""Losses for multi-task fine-tuning: chunked per-token cross entropy and the weighted task loss modes.

The pipeline of one optimiser step::

    final hidden states [B, T, D] --chunked_cross_entropy--> per-token CE [N]  (N = tokens with labels != -100)
        --TaskWeightedLoss--> per-sample / per-task reduction over the GLOBAL batch --> scalar share

Only tokens that carry a loss are projected onto the vocabulary, a chunk at a time, and each chunk's log-softmax
is taken in float32, so a ``[tokens, vocab]`` float32 tensor never exists, neither in forward nor saved for
backward. The projection itself runs in the model's dtype (bf16 matmuls are 2.5x faster than float32 ones on a
CPU with avx512_bf16, more on GPUs; the logits are rounded to bf16 as in transformers, torchtune and Liger) or,
with ``projection_dtype="float32"``, in float32.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mft_components.distributed import all_reduce_sum, is_distributed, to_device

IGNORE_INDEX = -100
# Batch key of the loss tokens' positions in the flattened [B*T] micro-batch, computed on the host before the batch
# goes to the device (models.prepare_batch): selecting loss tokens with a boolean mask on a GPU would make the
# host wait for the device (the result's size is data-dependent); an index of known length does not.
LOSS_INDEX = "loss_index"


def loss_token_index(labels: torch.Tensor) -> torch.Tensor:
    """int64 positions of the tokens with ``labels != -100`` in ``labels.reshape(-1)`` (row-major order)."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# Chunked cross entropy
# ---------------------------------------------------------------------------------------------------------------


PROJECTION_DTYPES = ("model", "float32")
# `loss.cross_entropy`: mft's chunked cross entropy, or liger-kernel's fused linear cross entropy (CUDA, optional
# extra `pip install 'mft[gpu]'`); both return exact per-token losses, so every loss mode and split invariance hold.
CROSS_ENTROPY_KERNELS = ("chunked", "liger")


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """float32 logits of one chunk of hidden states projected in ``w``'s dtype, soft-capped when ``softcap`` is set."""
    logits = (h.to(w.dtype) @ w.t()).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _cap_grad(capped: torch.Tensor, softcap: float | None) -> torch.Tensor | None:
    # d(tanh(x / c) * c) / dx = 1 - tanh^2(x / c) = 1 - (capped / c)^2, taken before logits is overwritten
    return 1.0 - (capped / softcap).square() if softcap is not None else None


def _softmax_minus_onehot_(probs: torch.Tensor, targets: torch.Tensor, cap_grad: torch.Tensor | None) -> torch.Tensor:
    probs.scatter_add_(1, targets[:, None], torch.full((targets.shape[0], 1), -1.0, device=probs.device))
    return probs.mul_(cap_grad) if cap_grad is not None else probs


def _logit_grad_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """d loss / d (pre-cap) logits = (softmax - onehot(target)) [* cap derivative], computed in ``logits``' memory."""
    cap_grad = _cap_grad(logits, softcap)
    return _softmax_minus_onehot_(logits.sub_(lse[:, None]).exp_(), targets, cap_grad)


def _lse_and_logit_grad_(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    """(log-sum-exp, ``_logit_grad_``) of a chunk in ``logits``' memory: no [chunk, V] temporary (logsumexp makes
    one, and its exponentials would be computed a second time for the gradient)."""
    cap_grad = _cap_grad(logits, softcap)
    row_max = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(row_max).exp_()
    total = exp.sum(dim=-1, keepdim=True)
    grad = _softmax_minus_onehot_(exp.div_(total), targets, cap_grad)
    return (row_max + total.log()).squeeze(1), grad


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token CE of ``h @ w.T`` computed chunk by chunk, never holding more than one chunk's float32 logits.

    Two ways to get the gradient, both exact:

    * frozen ``w`` (LoRA, QLoRA): each token's loss depends on its own hidden state only, so forward also computes
      ``d loss_i / d h_i`` ([N, D]) and backward just scales it by the incoming per-token gradient: two
      projections onto the vocabulary per token instead of three.
    * trainable ``w`` (full fine-tuning): forward saves ``h``, ``w``, ``targets`` and the per-token log-sum-exp;
      backward recomputes each chunk's logits (the weight gradient needs the incoming gradient first).

    ``float32_projection`` upcasts ``h`` and ``w`` before projecting; otherwise the matmuls run in ``w``'s dtype.
    """

    @staticmethod
    def forward(ctx, h, w, targets, chunk_size, softcap, float32_projection):
        # One copy of the weight in the projection dtype for the whole pass instead of one per chunk (none when
        # it already has that dtype); freed when forward returns.
        wp = w.float() if float32_projection else w
        n = h.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        ctx.grad_in_forward = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        grad_h = torch.empty(h.shape, dtype=wp.dtype, device=h.device) if ctx.grad_in_forward else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _chunk_logits(h[start:end], wp, softcap)
            target_logit = logits.gather(1, targets[start:end, None]).squeeze(1)
            if grad_h is not None:
                chunk_lse, grad = _lse_and_logit_grad_(logits, targets[start:end], softcap)
                grad_h[start:end] = grad.to(wp.dtype) @ wp
            else:
                chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[start:end] = chunk_lse
            losses[start:end] = chunk_lse - target_logit
            del logits
        if grad_h is not None:
            ctx.save_for_backward(grad_h)
        else:
            ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.softcap = softcap
        ctx.float32_projection = float32_projection
        ctx.h_dtype = h.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        if ctx.grad_in_forward:
            (grad_h,) = ctx.saved_tensors
            return (grad_h.float() * grad_losses.float()[:, None]).to(ctx.h_dtype), None, None, None, None, None
        h, w, targets, lse = ctx.saved_tensors
        chunk_size, softcap = ctx.chunk_size, ctx.softcap
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wp = w.float() if ctx.float32_projection else w
        grad_h = torch.empty_like(h) if need_h else None
        grad_w32 = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_losses = grad_losses.float()
        n = h.shape[0]
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            hp = h[start:end].to(wp.dtype)
            # In place, so a chunk costs one [chunk, V] float32 buffer; scaled by the incoming per-token gradient.
            grad_logits = _logit_grad_(_chunk_logits(hp, wp, softcap), lse[start:end], targets[start:end], softcap)
            grad_logits = grad_logits.mul_(grad_losses[start:end, None]).to(wp.dtype)
            if need_h:
                grad_h[start:end] = (grad_logits @ wp).to(h.dtype)
            if need_w:
                if wp.dtype == torch.float32:
                    grad_w32.addmm_(grad_logits.t(), hp)
                else:  # the weight gradient is accumulated over chunks in float32
                    grad_w32.add_(grad_logits.t() @ hp)
            del grad_logits
        grad_w = grad_w32.to(w.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
    projection_dtype: str = "model",
    loss_index: torch.Tensor | None = None,
    kernel: str = "chunked",
) -> torch.Tensor:
    """Per-token cross entropy of ``hidden @ weight.T`` against ``labels``, for loss-carrying tokens only.

    Tokens whose label is -100 are dropped BEFORE the projection; the remaining N tokens are projected onto the
    vocabulary ``chunk_size`` at a time and scored in float32 (log-sum-exp, softmax, soft-capping). Peak memory
    is O(chunk_size * V) float32 instead of O(N * V).
    Labels are already shifted (see the batch format): ``labels[b, t]`` is the target of position t.

    Under FSDP2 call it inside the root module's forward, where ``lm_head.weight`` has been unsharded into a
    plain tensor. If it is handed a DTensor anyway (e.g. outside the root forward), it is all-gathered with
    ``full_tensor()`` (differentiable: its gradient is reduce-scattered back), which is what FSDP's unshard
    would do; a vocab-parallel CE is not implemented.

    Args:
        hidden (torch.Tensor): final hidden states ``[..., D]`` (any float dtype).
        weight (torch.Tensor): ``lm_head`` weight ``[V, D]`` (plain tensor or DTensor).
        labels (torch.Tensor): int64 targets ``[...]`` matching ``hidden.shape[:-1]``; -100 = no loss.
        chunk_size (int): tokens projected at once.
        softcap (float | None): Gemma-2 final logit soft-capping, ``tanh(logits / softcap) * softcap``.
        projection_dtype (str): ``"model"`` projects in ``weight``'s dtype (bf16 logits for a bf16 model, as
            transformers computes them), ``"float32"`` upcasts the chunk and the weight first (exact logits, about
            2.5x slower matmuls for a bf16 model on CPU).
        loss_index (torch.Tensor | None): ``loss_token_index(labels)`` computed on the host (``LOSS_INDEX`` of a
            prepared batch): the loss tokens are gathered without a device-to-host wait, and the labels were
            range-checked on the host.
        kernel (str): ``chunked`` (this module) or ``liger`` (liger-kernel's fused linear cross entropy with
            ``reduction="none"``, CUDA only; projects in the same dtype).

    Returns:
        torch.Tensor: float32 ``[N]`` losses of the tokens with ``labels != -100``, in row-major order.

    Raises:
        ValueError: on shape mismatches or a non-positive chunk size.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be a positive int, got {chunk_size}")
    if projection_dtype not in PROJECTION_DTYPES:
        raise ValueError(f"chunked_cross_entropy: projection_dtype must be one of {PROJECTION_DTYPES}, "
                         f"got {projection_dtype!r}")
    if kernel not in CROSS_ENTROPY_KERNELS:
        raise ValueError(f"chunked_cross_entropy: kernel must be one of {CROSS_ENTROPY_KERNELS}, got {kernel!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"chunked_cross_entropy: hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree; "
            "expected hidden [..., D] with labels [...]"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"chunked_cross_entropy: weight {tuple(weight.shape)} must be [V, D] with D = {hidden.shape[-1]}"
        )
    if hasattr(weight, "full_tensor"):  # DTensor (sharded lm_head outside FSDP2's root forward)
        weight = weight.full_tensor()
    flat_labels = labels.reshape(-1)
    # Select loss tokens before projecting: prompt and padding tokens never reach the vocabulary.
    if loss_index is not None:
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, loss_index)
        targets = flat_labels.index_select(0, loss_index)
    else:
        keep = flat_labels != IGNORE_INDEX
        h = hidden.reshape(-1, hidden.shape[-1])[keep]
        targets = flat_labels[keep]
        check_label_range(targets, weight.shape[0])
    if kernel == "liger":
        return _liger_cross_entropy(h, weight, targets, softcap, projection_dtype == "float32")
    return _ChunkedCrossEntropy.apply(h, weight, targets, int(chunk_size), softcap, projection_dtype == "float32")


def check_label_range(targets: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError unless every target is in ``[0, vocab_size)`` (reads the values: call it on the host)."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(
            f"chunked_cross_entropy: labels must be -100 or in [0, {vocab_size}), "
            f"got range [{int(targets.min())}, {int(targets.max())}]"
        )


def _liger_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                         float32_projection: bool) -> torch.Tensor:
    """Per-token losses from liger-kernel's fused linear cross entropy (Triton: chunked logits, log-softmax and
    gradient in one kernel per chunk). ``reduction="none"`` keeps one loss per token; every token passed carries
    a loss, so its ignore_index never applies."""
    if h.device.type != "cuda":
        raise ValueError("loss.cross_entropy: liger runs on CUDA only (Triton kernels); use chunked on "
                         f"{h.device.type}")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if float32_projection:
        h, weight = h.float(), weight.float()
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=softcap)
    return loss(weight, h, targets).float()


# ---------------------------------------------------------------------------------------------------------------
# Task-weighted reduction over the global batch of one optimiser step
# ---------------------------------------------------------------------------------------------------------------

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
        router_aux_loss_coef (float): coefficient of the MoE load-balancing loss.

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
        router_aux_loss_coef: float = 0.0,
    ):
        resolved = LOSS_MODE_ALIASES.get(str(mode).lower(), str(mode).lower())
        if resolved not in LOSS_MODES:
            raise ValueError(
                f"loss.mode: expected one of {', '.join(LOSS_MODES)} (or MFTCoder's case1..case4), got {mode!r}"
            )
        if resolved == "coba" and task_weights is not None:
            raise ValueError("loss.task_weights: not used with loss.mode=coba (CoBa computes the weights); remove it")
        if chunk_size <= 0:
            raise ValueError(f"loss.chunk_size: expected a positive int, got {chunk_size}")
        if projection_dtype not in PROJECTION_DTYPES:
            raise ValueError(f"loss.projection_dtype: expected one of {', '.join(PROJECTION_DTYPES)}, "
                             f"got {projection_dtype!r}")
        if cross_entropy not in CROSS_ENTROPY_KERNELS:
            raise ValueError(f"loss.cross_entropy: expected one of {', '.join(CROSS_ENTROPY_KERNELS)}, "
                             f"got {cross_entropy!r}")
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
        self.router_aux_loss_coef = float(router_aux_loss_coef)
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


# ---------------------------------------------------------------------------------------------------------------
# CoBa: convergence balancing of task weights (arXiv 2410.06741)
# ---------------------------------------------------------------------------------------------------------------


def _ls_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y over x using the finite points; 0 with fewer than two."""
    pts = [(a, b) for a, b in zip(x, y) if math.isfinite(b)]
    if len(pts) < 2:
        return 0.0
    mx = sum(a for a, _ in pts) / len(pts)
    my = sum(b for _, b in pts) / len(pts)
    sxx = sum((a - mx) ** 2 for a, _ in pts)
    if sxx == 0:
        return 0.0
    return sum((a - mx) * (b - my) for a, b in pts) / sxx


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


class CoBa:
    """Convergence Balancer: task weights from the slopes of normalised validation losses.

    At each update t (every ``coba_update_interval`` steps), with K tasks::

        y_k(t)      = L^val_k(t) / L^val_k(0)               validation loss normalised by its value before training
        a_k(t)      = least-squares slope of y_k over the last H updates (H = history_length)
        a_max(t)    = slope of max_k y_k over the same window
        RCS(t)      = softmax_k( K * a_k(t) / sum_j |a_j(t)| )                  slow / diverging tasks up
        ACS_k(t)    = softmax_k( -n * a_k(t) / sum_{s in last n} |a_k(s)| )     n = slopes kept (<= H):
                                                                                a task whose own slope
                                                                                flattens or turns up goes down
        DF(t)       = min(1, m * softmax_s( -tau * m * a_max(s) / sum_s |a_max(s)| )[t])
                      over all m slopes of a_max since warmup: ~1 while the worst task still converges as
                      fast as before (RCS decides), -> 0 when it flattens or diverges (ACS decides)
        w(t)        = softmax_k( K * (DF * RCS + (1 - DF) * ACS) )
        floor       if min_k w_k < 1/(10K):  w <- (1 - K * 1/(10K)) * w + 1/(10K) = 0.9 * w + 0.1 / K
                    (a mix with the uniform distribution: every weight >= 1/(10K), the sum stays 1)

    Weights are uniform until ``step >= warmup_steps``; slopes are only fitted from then on. A ratio whose
    denominator is 0 (all slopes 0) counts as 0. Missing validation losses (NaN) are skipped by the fits.
    This follows the paper and MFTCoder's ``CoBaStatus``; differences: DF is capped at 1 as in the paper
    (MFTCoder does not cap), and ACS uses the last n slopes (MFTCoder indexes its slope list by step).
    """

    def __init__(self, warmup_steps: int = 100, history_length: int = 200, tau: float = 5):
        self.warmup_steps = int(warmup_steps)
        self.history_length = int(history_length)
        self.tau = float(tau)
        self.num_tasks = 0
        self.weights: list[float] = []
        self.initial: list[float] = []
        self.steps: list[int] = []
        self.history: list[list[float]] = []  # [update][task] normalised validation loss
        self.task_slopes: list[list[float]] = []  # [update][task]
        self.max_slopes: list[float] = []
        self.last: dict[str, float] = {}

    def setup(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.weights = [1.0 / num_tasks] * num_tasks
        self.initial = [math.nan] * num_tasks
        self.steps, self.history, self.task_slopes, self.max_slopes = [], [], [], []

    @property
    def floor(self) -> float:
        return 1.0 / (10 * self.num_tasks)

    def set_reference(self, losses: list[float]) -> None:
        """Normalise each task's curve by ``losses`` (finite, positive ones), before any update."""
        self.initial = [loss if math.isfinite(loss) and loss > 0 else math.nan for loss in losses]

    def update(self, step: int, losses: list[float]) -> list[float]:
        """Record validation losses at ``step`` and recompute the weights (see the class docstring)."""
        k = self.num_tasks
        # Normalise by each task's reference: its loss on the whole validation split before training
        # (set_reference), else its first finite sampled validation loss.
        for i, loss in enumerate(losses):
            if not math.isfinite(self.initial[i]) and math.isfinite(loss) and loss > 0:
                self.initial[i] = loss
        y = [loss / self.initial[i] if math.isfinite(self.initial[i]) else math.nan for i, loss in enumerate(losses)]
        self.steps.append(int(step))
        self.history.append(y)
        del self.steps[: -self.history_length], self.history[: -self.history_length]
        if step < self.warmup_steps:
            return self.weights

        xs = [float(s) for s in self.steps]
        slopes = [_ls_slope(xs, [row[i] for row in self.history]) for i in range(k)]
        worst = [max((v for v in row if math.isfinite(v)), default=math.nan) for row in self.history]
        self.task_slopes.append(slopes)
        del self.task_slopes[: -self.history_length]
        self.max_slopes.append(_ls_slope(xs, worst))

        abs_sum = sum(abs(a) for a in slopes)
        rcs = _softmax([k * _safe_div(a, abs_sum) for a in slopes])
        n = len(self.task_slopes)
        own = [sum(abs(row[i]) for row in self.task_slopes) for i in range(k)]
        acs = _softmax([-n * _safe_div(slopes[i], own[i]) for i in range(k)])
        m = len(self.max_slopes)
        max_abs = sum(abs(a) for a in self.max_slopes)
        df = min(1.0, m * _softmax([-self.tau * m * _safe_div(a, max_abs) for a in self.max_slopes])[-1])
        raw = _softmax([k * (df * r + (1 - df) * a) for r, a in zip(rcs, acs)])
        w = raw
        if min(raw) < self.floor:
            w = [(1 - k * self.floor) * x + self.floor for x in raw]
        self.weights = w
        # The terms of the last update, for logging and tests.
        self.last = {"df": df, "rcs": rcs, "acs": acs, "raw": raw, "slopes": slopes, "max_slope": self.max_slopes[-1]}
        return w

    def state_dict(self) -> dict:
        return {
            "weights": list(self.weights),
            "initial": list(self.initial),
            "steps": list(self.steps),
            "history": [list(r) for r in self.history],
            "task_slopes": [list(r) for r in self.task_slopes],
            "max_slopes": list(self.max_slopes),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["weights"]) != self.num_tasks:
            raise ValueError(
                f"CoBa.load_state_dict: checkpoint has {len(state['weights'])} tasks, setup() was given {self.num_tasks}"
            )
        self.weights = [float(x) for x in state["weights"]]
        self.initial = [float(x) for x in state["initial"]]
        self.steps = [int(x) for x in state["steps"]]
        self.history = [[float(v) for v in r] for r in state["history"]]
        self.task_slopes = [[float(v) for v in r] for r in state["task_slopes"]]
        self.max_slopes = [float(x) for x in state["max_slopes"]]


# ---------------------------------------------------------------------------------------------------------------
# MoE load balancing
# ---------------------------------------------------------------------------------------------------------------


def router_aux_loss(router_logits, num_experts: int, top_k: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch / Mixtral load-balancing loss over real tokens only.

    ``E * sum_e f_e * P_e`` where, over the real tokens of all layers, f_e is the fraction of (token, top-k slot)
    assignments routed to expert e (summing to top_k) and P_e the mean router probability of expert e. This is
    transformers' ``load_balancing_loss_func`` (its attention_mask is exactly a real-token mask, 1 = real), which
    we call rather than copy.

    Args:
        router_logits (tuple | list | torch.Tensor): per layer ``[B*T, E]`` or ``[B, T, E]`` router logits.
        num_experts (int): E.
        top_k (int): experts per token.
        token_mask (torch.Tensor | None): bool ``[B, T]``, True for real tokens (e.g. ``sample_ids >= 0``);
            None = all real.

    Returns:
        torch.Tensor: scalar float32 loss (0 when ``router_logits`` is empty).
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if torch.is_tensor(router_logits):
        router_logits = (router_logits,)
    layers = tuple(t.reshape(-1, t.shape[-1]) for t in router_logits if t is not None)
    if not layers:
        return torch.zeros((), dtype=torch.float32)
    mask = None if token_mask is None else token_mask.reshape(1, -1).to(torch.float32)
    if mask is not None and mask.shape[1] != layers[0].shape[0]:
        raise ValueError(
            f"router_aux_loss: token_mask has {mask.shape[1]} tokens, router logits have {layers[0].shape[0]} rows"
        )
    return load_balancing_loss_func(layers, num_experts, top_k, mask).float()
