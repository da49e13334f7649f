"""Preference losses per pair (DPO, IPO, RPO, ORPO, SimPO), reduced per task exactly over an optimizer step.

    per-token CE [N] of a micro-batch of packed pairs (``MFTModel.forward``)
        --pair_logps--> per pair: chosen / rejected log-prob sums and answer token counts
        --PreferenceLoss--> per-pair loss l_p --sample / task reduction over the GLOBAL step--> scalar share

With pi_c, pi_r the policy's summed answer log-probs of the chosen and rejected sequences, ref_c, ref_r the
reference's, n_c, n_r their loss-token counts, and ``beta``::

    dpo    l = -(1-ls) logsig(beta h) - ls logsig(-beta h),  h = (pi_c - ref_c) - (pi_r - ref_r)   (cDPO smoothing)
    ipo    l = (h' - 1 / (2 beta))^2,  h' = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r            (TRL's IPO)
    rpo    dpo + rpo_alpha * (-pi_c / n_c)                                 (the chosen answer's token-mean NLL)
    orpo   l = -pi_c / n_c - beta * logsig(log odds(a_c) - log odds(a_r)),  a = pi / n  (beta is ORPO's lambda)
    simpo  l = -(1-ls) logsig(beta (a_c - a_r) - gamma) - ls logsig(-(...)),  a = pi / n    (no reference)

Rewards (for accuracy and margin) are beta (pi - ref) for dpo/ipo/rpo and beta * a for orpo/simpo, as TRL logs
them. Reductions (``loss.mode``): ``sample`` L = sum_p l_p / P; ``task`` (default) L = sum_t w_t (sum_{p in t}
l_p / P_t) / W over the tasks present in the step, with P, P_t counted over every micro-batch of every rank
(``step_counts``, one all-reduce), so the loss and its gradients do not depend on the split into ranks x
micro-batches. Differences from TRL, all by design: RPO's and ORPO's NLL is each pair's token mean (TRL takes
the token mean over the whole batch: equal when answers have equal lengths), so a pair's loss never depends on
its batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mft_components.device import to_device
from mft_components.distributed import all_reduce_sum
from mft_components.loss.cross_entropy import IGNORE_INDEX, LOSS_INDEX, check_cross_entropy_options

__all__ = ["PREFERENCE_LOSSES", "REFERENCE_FREE", "PREFERENCE_MODES", "METRICS", "pair_logps", "pair_losses",
           "PreferenceLoss"]

PREFERENCE_LOSSES = ("dpo", "ipo", "rpo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
PREFERENCE_MODES = ("task", "sample")
# Per-task sums a step accumulates (with the pair count, the metric is their mean over the task's pairs).
METRICS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")


def pair_logps(token_losses: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair of ``batch``: (log-prob sums float32 [P, 2] chosen/rejected, loss-token counts float64 [P, 2]).

    The sequences' sample ids are 2p (chosen) and 2p + 1 (rejected) for the micro-batch's pair p
    (``data.preference.collate_pairs``); ``token_losses`` are per-token CE in the order of ``labels != -100``.
    """
    num_pairs = batch["pair_task_ids"].shape[0]
    index = batch.get(LOSS_INDEX)
    sample_ids = (batch["sample_ids"].reshape(-1)[index] if index is not None
                  else batch["sample_ids"][batch["labels"] != IGNORE_INDEX]).to(token_losses.device)
    sums = torch.zeros(2 * num_pairs, dtype=torch.float32, device=token_losses.device)
    sums = sums.index_add(0, sample_ids, -token_losses.float())
    counts = torch.zeros(2 * num_pairs, dtype=torch.float64, device=token_losses.device)
    counts.index_add_(0, sample_ids, torch.ones_like(sample_ids, dtype=torch.float64))
    return sums.reshape(num_pairs, 2), counts.reshape(num_pairs, 2)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(kind: str, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None, *, beta: float,
                label_smoothing: float = 0.0, rpo_alpha: float = 1.0, gamma: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair losses [P], rewards [P, 2]) of loss ``kind`` (module docstring) from the policy's summed
    log-probs ``logps`` [P, 2], the answers' token counts [P, 2] and the reference's ``ref`` [P, 2]."""
    n = counts.to(logps.dtype).clamp(min=1)
    avg = logps / n
    if kind in ("dpo", "ipo", "rpo"):
        ratios = logps - ref.to(logps.dtype)
        rewards = beta * ratios.detach()
        if kind == "ipo":
            h = ratios[:, 0] / n[:, 0] - ratios[:, 1] / n[:, 1]
            return (h - 1 / (2 * beta)) ** 2, rewards
        h = ratios[:, 0] - ratios[:, 1]
        loss = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
        if kind == "rpo":
            loss = loss + rpo_alpha * -avg[:, 0]
        return loss, rewards
    rewards = beta * avg.detach()
    if kind == "orpo":
        log_odds = (avg[:, 0] - avg[:, 1]) - (_log1mexp(avg[:, 0]) - _log1mexp(avg[:, 1]))
        return -avg[:, 0] - beta * F.logsigmoid(log_odds), rewards
    if kind == "simpo":
        h = avg[:, 0] - avg[:, 1] - gamma / beta
        return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing, rewards
    raise ValueError(f"loss.preference: expected one of {', '.join(PREFERENCE_LOSSES)}, got {kind!r}")


class PreferenceLoss:
    """A preference loss (``loss.preference``) with SFT's per-task reductions, exact over the optimizer step.

    Usage in a recipe (the protocol of ``TaskWeightedLoss``, which ``read_log_step`` reads)::

        counts = loss_fn.step_counts(host_batches, device=device)      # pairs per task, all ranks
        for mb in micro_batches:
            token_losses, _ = model(mb, **loss_fn.ce_kwargs)
            share = loss_fn(token_losses, mb, counts, ref_logps=...)   # ref: [P, 2] or None for orpo / simpo
            (share * world_size).backward()

    Args:
        preference: dpo | ipo | rpo | orpo | simpo.
        beta: DPO's beta (ipo: tau; orpo: lambda; simpo: beta).
        label_smoothing: cDPO / SimPO label smoothing in [0, 0.5).
        rpo_alpha: weight of the chosen NLL in rpo.
        gamma: SimPO's target margin (TRL's ``simpo_gamma``).
        mode: ``task`` (default) or ``sample``.
        task_weights: per-task w_t for ``task`` mode (mapping by task name or a list).
        chunk_size, projection_dtype, cross_entropy: the chunked cross entropy's settings (as ``TaskWeightedLoss``).

    Raises:
        ValueError: naming the ``loss.*`` key.
    """

    def __init__(self, preference: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                 rpo_alpha: float = 1.0, gamma: float = 0.5, mode: str = "task",
                 task_weights: dict[str, float] | list[float] | None = None, chunk_size: int = 1024,
                 projection_dtype: str = "model", cross_entropy: str = "chunked"):
        if preference not in PREFERENCE_LOSSES:
            raise ValueError(f"loss.preference: expected one of {', '.join(PREFERENCE_LOSSES)}, got {preference!r}")
        if mode not in PREFERENCE_MODES:
            raise ValueError(f"loss.mode: expected one of {', '.join(PREFERENCE_MODES)} for preference tuning "
                             f"(per pair), got {mode!r}")
        if not beta > 0:
            raise ValueError(f"loss.beta: expected a positive number, got {beta!r}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing: expected a number in [0, 0.5), got {label_smoothing!r}")
        if label_smoothing and preference not in ("dpo", "rpo", "simpo"):
            raise ValueError(f"loss.label_smoothing: only dpo, rpo and simpo use it, not {preference}")
        if rpo_alpha < 0:
            raise ValueError(f"loss.rpo_alpha: expected a non-negative number, got {rpo_alpha!r}")
        check_cross_entropy_options(chunk_size, projection_dtype, cross_entropy, config=True)
        self.preference, self.mode = preference, mode
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)
        self.rpo_alpha, self.gamma = float(rpo_alpha), float(gamma)
        self.chunk_size, self.projection_dtype, self.cross_entropy = int(chunk_size), projection_dtype, cross_entropy
        self._user_weights = task_weights
        self.task_names: list[str] | None = None
        self._weights: list[float] | None = None
        self.router_aux_loss_coef = 0.0

    def resolve_router_aux_loss_coef(self, model_config, moe: bool) -> str:
        """The SFT loss's hook (the recipe calls it once the model is built): preference losses add no
        load-balancing term, as TRL's DPOTrainer does not unless asked; said for the log of a MoE model."""
        return "loss.router_aux_loss_coef: 0 (the preference losses add no router load-balancing loss)"

    @property
    def needs_reference(self) -> bool:
        return self.preference not in REFERENCE_FREE

    @property
    def ce_kwargs(self) -> dict:
        return {"chunk_size": self.chunk_size, "projection_dtype": self.projection_dtype,
                "cross_entropy": self.cross_entropy}

    def setup(self, task_names: list[str]) -> None:
        """Bind the task names and resolve ``task_weights`` against them.

        Raises:
            ValueError: an unknown task, a list of the wrong length, negative or all-zero weights.
        """
        self.task_names = list(task_names)
        k, w = len(self.task_names), self._user_weights
        if w is None:
            weights = [1.0] * k
        elif isinstance(w, Mapping):
            unknown = sorted(set(w) - set(self.task_names))
            if unknown:
                raise ValueError(f"loss.task_weights: unknown task(s) {unknown}; the tasks are {self.task_names}")
            weights = [float(w.get(name, 1.0)) for name in self.task_names]
        else:
            weights = [float(x) for x in w]
            if len(weights) != k:
                raise ValueError(f"loss.task_weights: a list needs one weight per task ({k}: {self.task_names}), "
                                 f"got {len(weights)}")
        if any(x < 0 for x in weights) or sum(weights) <= 0:
            raise ValueError(f"loss.task_weights: expected non-negative weights, not all 0, got {weights}")
        self._weights = weights
        self._reset(torch.device("cpu"))

    def _reset(self, device: torch.device) -> None:
        k = len(self.task_names)
        self._sums = torch.zeros(len(METRICS), k, dtype=torch.float64, device=device)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._pairs = torch.zeros(k, dtype=torch.int64, device=device)

    def step_counts(self, micro_batches: list[dict], group=None, device: torch.device | None = None) -> torch.Tensor:
        """Pairs per task over the step's micro-batches of every rank (int64 [K], one all-reduce; collective).
        Starts a new step for the metrics."""
        k = len(self.task_names)
        counts = torch.zeros(k, dtype=torch.int64)
        for batch in micro_batches:
            counts += torch.bincount(batch["pair_task_ids"].cpu(), minlength=k)[:k]
        counts = to_device(counts, device or torch.device("cpu"))
        all_reduce_sum(counts, group)
        self._reset(counts.device)
        self._pairs = counts.clone()
        return counts

    def pair_coefficients(self, pair_tasks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """c_p with L = sum_p c_p l_p over the step (module docstring), float64 [P]."""
        counts = counts.to(pair_tasks.device, torch.float64)
        if self.mode == "sample":
            return torch.full(pair_tasks.shape, 1.0, dtype=torch.float64, device=pair_tasks.device) / counts.sum()
        w = torch.tensor(self._weights, dtype=torch.float64, device=pair_tasks.device)
        w = torch.where(counts > 0, w, torch.zeros_like(w))
        per_task = w / (counts.clamp(min=1) * w.sum().clamp(min=torch.finfo(torch.float64).tiny))
        return per_task[pair_tasks]

    def __call__(self, token_losses: torch.Tensor, batch: dict, counts: torch.Tensor,
                 ref_logps: torch.Tensor | None = None) -> torch.Tensor:
        """This micro-batch's exact share of the step loss; accumulates the per-task metrics.

        Args:
            token_losses: per-token CE of the batch (``MFTModel.forward``).
            batch: the micro-batch of packed pairs.
            counts: ``step_counts`` of this step.
            ref_logps: the reference's summed log-probs [P, 2] (dpo, ipo, rpo); ignored by orpo and simpo.
        """
        losses, metric_sums = self.pair_losses_and_metrics(token_losses, batch, ref_logps)
        tasks = batch["pair_task_ids"].to(losses.device)
        share = (losses.double() * self.pair_coefficients(tasks, counts).to(losses.device)).sum()
        self._sums = self._sums.to(losses.device) + metric_sums
        self._loss_sum = self._loss_sum.to(losses.device) + share.detach()
        return share.float()

    def pair_losses_and_metrics(self, token_losses: torch.Tensor, batch: dict, ref_logps: torch.Tensor | None = None
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-pair losses [P], per-task sums of ``METRICS`` float64 [len(METRICS), K]) of a micro-batch, without
        touching the step's state (validation uses it alone)."""
        logps, n = pair_logps(token_losses, batch)
        if self.needs_reference and ref_logps is None:
            raise ValueError(f"loss.preference {self.preference} needs the reference log-probs of the batch")
        losses, rewards = pair_losses(self.preference, logps, n, ref_logps, beta=self.beta,
                                      label_smoothing=self.label_smoothing, rpo_alpha=self.rpo_alpha,
                                      gamma=self.gamma)
        tasks = batch["pair_task_ids"].to(losses.device)
        values = torch.stack([losses.detach().double(), (rewards[:, 0] > rewards[:, 1]).double(),
                              (rewards[:, 0] - rewards[:, 1]).double(), rewards[:, 0].double(),
                              rewards[:, 1].double(), logps[:, 0].detach().double(), logps[:, 1].detach().double()])
        sums = torch.zeros(len(METRICS), len(self.task_names), dtype=torch.float64, device=losses.device)
        return losses, sums.index_add(1, tasks, values)

    # -- the protocol read_log_step reads ------------------------------------------------------------------
    def step_loss(self) -> torch.Tensor:
        return self._loss_sum

    def step_sums(self) -> torch.Tensor:
        """float64 [2 + len(METRICS) * K]: the weighted loss, 0 (no auxiliary loss), the per-task metric sums."""
        device = self._sums.device
        return torch.cat([self._loss_sum.reshape(1).to(device), torch.zeros(1, dtype=torch.float64, device=device),
                          self._sums.reshape(-1)])

    def step_token_counts(self) -> torch.Tensor:
        """Pairs per task of the step (global), float64 [K]."""
        return self._pairs.to(self._sums.device, torch.float64)

    def step_metrics(self, group=None, values: list[float] | None = None) -> dict[str, float]:
        """``loss`` (the weighted step loss) and, overall and per task, the means over pairs of ``METRICS``
        (``accuracy``: reward accuracy) and ``pairs/<task>`` (collective unless ``values`` are given)."""
        k = len(self.task_names)
        if values is None:
            values = torch.cat([all_reduce_sum(self.step_sums(), group), self.step_token_counts()]).tolist()
        sums = torch.tensor(values[2:2 + len(METRICS) * k], dtype=torch.float64).reshape(len(METRICS), k)
        pairs = torch.tensor(values[2 + len(METRICS) * k:], dtype=torch.float64)
        return summarise(float(values[0]), sums, pairs, self.task_names)

    def state_dict(self) -> dict:
        return {"preference": self.preference, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"loss.mode: the checkpoint has {state.get('mode')!r}, this config {self.mode!r}")


def summarise(loss: float, sums: torch.Tensor, pairs: torch.Tensor, task_names: list[str]) -> dict[str, float]:
    """Metric means from per-task sums [len(METRICS), K] and pair counts [K]: overall (over pairs) and per task."""
    out = {"loss": loss}
    total = float(pairs.sum())
    for i, name in enumerate(METRICS):
        if total and name != "loss":
            out[name] = float(sums[i].sum()) / total
    for t, task in enumerate(task_names):
        n = float(pairs[t])
        out[f"pairs/{task}"] = int(n)
        if n:
            for i, name in enumerate(METRICS):
                out[f"{name}/{task}"] = float(sums[i, t]) / n
    return out
