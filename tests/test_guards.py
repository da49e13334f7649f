"""Tests for mft_components/training/guards.py's NonFiniteGuard: with a fused AdamW (the recipe's optimizer on CUDA; it
runs on the CPU too) a non-finite step leaves the weights and the optimizer state exactly as they were, without
the host reading anything, and the next check names that step, its values and tasks; other optimizers stop at
once, before their step."""

from __future__ import annotations

import math

import pytest
import torch

from mft_components.training.guards import NonFiniteGuard, NonFiniteLossError


def _step(guard, optimizer, param, step, loss_value):
    param.grad = torch.full_like(param, 0.5)
    grad_norm = torch.nn.utils.clip_grad_norm_([param], 1.0)
    guard.update(step, torch.tensor(loss_value, dtype=torch.float64), grad_norm, [torch.tensor([[0, 1, -1]])])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_deferred_guard_skips_the_update_and_names_the_first_bad_step():
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    guard = NonFiniteGuard(optimizer, ["add", "upper"])
    assert guard.deferred
    _step(guard, optimizer, param, 1, 2.0)
    guard.check()  # all finite: nothing to report
    after_good = param.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[param].items()}
    _step(guard, optimizer, param, 2, math.nan)
    _step(guard, optimizer, param, 3, math.inf)
    # the bad steps changed neither the weights nor AdamW's moments and step count
    torch.testing.assert_close(param.detach(), after_good, rtol=0, atol=0)
    for key, value in optimizer.state[param].items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 2; tasks in this "
                                                 r"rank's batch: add, upper"):
        guard.check()


def test_immediate_guard_stops_before_the_step():
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([param], lr=0.1)
    guard = NonFiniteGuard(optimizer, ["add", "upper"])
    assert not guard.deferred
    _step(guard, optimizer, param, 1, 1.0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(inf\) at step 2"):
        _step(guard, optimizer, param, 2, math.inf)
