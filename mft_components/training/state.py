"""The recipe state of an exact resume, besides the weights: optimizer, schedule, loss, early stopping, and each
rank's data position and RNG streams.

    gather_training_state(model, optimizer, ...)    collective; the ``recipe_state.pt`` content on rank 0
    restore_training_state(state, model, ...)       collective under FSDP2; returns this rank's data position + RNG

The optimizer state is gathered to full tensors keyed by parameter name (so a run resumes on another number of
ranks); the per-rank states (loader position, RNG) are gathered onto rank 0 as they are. Everything is tensors,
numbers, strings and containers, so it loads with ``torch.load(weights_only=True)`` (``checkpoint.py`` writes it).
"""

from __future__ import annotations

import random
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from mft_components.distributed import get_rank, is_distributed

__all__ = ["capture_rng_state", "restore_rng_state", "gather_rank_states", "gather_optimizer_state",
           "load_optimizer_state", "keep_configured_hyperparameters", "gather_training_state",
           "restore_training_state"]


# ---------------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, numpy, python) in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -------------------------------------------------------------------------------------- distributed gathering


def gather_rank_states(local: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Collect one small per-rank dict (data loader position, RNG) from every rank onto rank 0.

    Collective: call on every rank. Returns the list indexed by rank on rank 0, None elsewhere; without a
    process group, ``[local]``.
    """
    if not is_distributed():
        return [local]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, out, dst=0)
    return out


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


@torch.no_grad()
def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as full (unsharded) CPU tensors keyed by parameter name, on rank 0 ({} elsewhere).

    Keyed by name rather than by FSDP shard, so a run may resume on another number of ranks. Collective under
    FSDP2 (every rank calls it; one state tensor is all-gathered at a time).
    """
    names = _param_names(model)
    rank0 = get_rank() == 0
    state: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            entry = {}
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, DTensor):
                    value = value.full_tensor()
                if rank0:
                    entry[key] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
            if rank0 and entry:
                state[names[id(p)]] = entry
    return {"state": state, "param_groups": groups} if rank0 else {}


@torch.no_grad()
def _check_state_shapes(saved: dict[str, Any], params: dict[str, torch.nn.Parameter]) -> None:
    """Every saved moment (AdamW's exp_avg, exp_avg_sq, ...) belongs to a parameter of this run and has its shape:
    a damaged or foreign recipe_state.pt is named here, not by a broadcasting error in the first step.

    Raises:
        ValueError: naming the parameter, the state and both shapes.
    """
    for name, entry in saved.items():
        if name not in params:
            raise ValueError(f"recipe_state.pt: the optimizer state names {name}, which this run does not train")
        shape = tuple(params[name].shape)  # a DTensor's shape is the full one, as saved
        for key, value in entry.items():
            if key != "step" and isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
                raise ValueError(f"recipe_state.pt: the optimizer's {key} of {name} has shape {tuple(value.shape)}, "
                                 f"the parameter {shape}; the file is damaged or from another model")


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state from :func:`gather_optimizer_state` into the optimizer of a (possibly sharded) model.

    Every rank passes the same full state and keeps its own shard of each tensor.

    Raises:
        ValueError: the saved parameter groups do not match the optimizer's (another model or method), or a
            saved moment does not have its parameter's shape.
    """
    names = _param_names(model)
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError("resume: the checkpoint's optimizer has other parameter groups than this run's")
    by_name, group_of = {}, {}
    for saved, group in zip(state["param_groups"], optimizer.param_groups):
        current = [names[id(p)] for p in group["params"]]
        if saved["params"] != current:
            raise ValueError("resume: the checkpoint's optimizer holds other parameters than this run's "
                             f"(e.g. {sorted(set(saved['params']) ^ set(current))[:3]}); same model.method and lora?")
        group.update({k: v for k, v in saved.items() if k != "params"})
        by_name.update({names[id(p)]: p for p in group["params"]})
        group_of.update({names[id(p)]: group for p in group["params"]})
    _check_state_shapes(state["state"], by_name)
    optimizer.state.clear()
    for name, entry in state["state"].items():
        p = by_name[name]
        restored = {}
        on_device_step = group_of[name].get("fused") or group_of[name].get("capturable")
        for key, value in entry.items():
            if key == "step" and isinstance(value, torch.Tensor) and on_device_step:
                # Fused / capturable AdamW reads `step` on the device (torch's Optimizer.load_state_dict does this)
                value = value.to(device=p.device, dtype=torch.float32)
            elif isinstance(value, torch.Tensor) and key != "step":
                value = value.to(device=p.device, dtype=value.dtype)
                if isinstance(p, DTensor):
                    value = distribute_tensor(value, p.device_mesh, p.placements)
            restored[key] = value
        optimizer.state[p] = restored


def keep_configured_hyperparameters(optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                                    configured: list[dict[str, Any]]) -> None:
    """After loading a checkpoint's optimizer and schedule state: this run's hyperparameters, not the saved ones.

    ``configured`` holds each group's values as this run built them (before loading). Everything but the lr is
    put back (weight_decay, betas, eps, this device's fused / foreach flags). The lr follows the schedule: its
    peak becomes this run's lr, and a ``LambdaLR`` schedule (``cosine_with_warmup``) recomputes the lr of the step
    it resumes at from its own factors, which follow this run's length (``max_steps`` / ``epochs``), warmup and
    min_lr; with nothing changed that is exactly the saved lr. Another scheduler's lr is scaled by new / saved peak.
    """
    for i, (group, mine) in enumerate(zip(optimizer.param_groups, configured)):
        group.update({k: v for k, v in mine.items() if k not in ("lr", "initial_lr")})
        peak = mine.get("initial_lr", mine["lr"])
        saved_peak = group.get("initial_lr", peak)
        if isinstance(getattr(lr_scheduler, "lr_lambdas", None), list):
            lr = peak * lr_scheduler.lr_lambdas[i](lr_scheduler.last_epoch)  # as LambdaLR.get_lr computes it
        elif saved_peak != peak and saved_peak:
            lr = group["lr"] * (peak / saved_peak)
        else:
            lr = group["lr"]
        group["initial_lr"], group["lr"] = peak, lr
        if hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs[i] = peak
        if isinstance(getattr(lr_scheduler, "_last_lr", None), list):
            lr_scheduler._last_lr[i] = lr


# ------------------------------------------------------------------------------------------ the recipe state


def gather_training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    lr_scheduler: Any,
    loss_fn: Any,
    early_stopping: Any,
    train_loader: Any,
    step: int,
    epoch: int,
    step_in_epoch: int,
) -> dict[str, Any] | None:
    """Everything besides the weights that an exact resume needs, gathered onto rank 0.

    Collective (every rank calls it). Returns the ``recipe_state.pt`` content on rank 0, None elsewhere::

        step, epoch, step_in_epoch         where the loop is
        optimizer                          full AdamW state keyed by parameter name (any world size can load it)
        lr_scheduler, loss, early_stopping their state_dicts (CoBa history, best step, patience count)
        ranks[r]                           rank r's data loader position and RNG states
    """
    optim = gather_optimizer_state(model, optimizer)
    ranks = gather_rank_states({"dataloader": train_loader.state_dict(), "rng": capture_rng_state()})
    if ranks is None:
        return None
    return {
        "step": step,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "optimizer": optim,
        "lr_scheduler": lr_scheduler.state_dict(),
        "loss": loss_fn.state_dict(),
        "early_stopping": early_stopping.state_dict(),
        "ranks": ranks,
    }


def restore_training_state(
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    lr_scheduler: Any,
    loss_fn: Any,
    early_stopping: Any,
    rank: int,
    world_size: int,
) -> dict[str, Any]:
    """Load a :func:`gather_training_state` state (collective under FSDP2); returns this rank's
    ``{"dataloader", "rng"}`` for the recipe to apply when it starts iterating.

    On another number of ranks the data position carries over (the sampler converts it at an optimizer-step
    boundary); RNG streams cannot, so dropout masks then differ from the uninterrupted run. The optimizer's
    hyperparameters and the schedule's peak lr and length are this run's (``keep_configured_hyperparameters``):
    a resume that changes them (``training/resume_check.py`` says which) trains with the new values.
    """
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    load_optimizer_state(model, optimizer, state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    keep_configured_hyperparameters(optimizer, lr_scheduler, configured)
    loss_fn.load_state_dict(state["loss"])
    early_stopping.load_state_dict(state["early_stopping"])
    ranks = state["ranks"]
    if len(ranks) != world_size and rank == 0:
        print(f"note: resuming a {len(ranks)}-rank run on {world_size} ranks: data position kept, RNG streams not",
              file=sys.stderr)
    return ranks[rank] if len(ranks) == world_size else {"dataloader": ranks[0]["dataloader"],
                                                         "rng": ranks[rank % len(ranks)]["rng"]}
