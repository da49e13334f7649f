"""Tests for mft_components/lr_schedule.py against the formula written out here."""

import io
import math

import pytest
import torch

from mft_components.training.lr_schedule import cosine_with_warmup, resolve_warmup_steps


def _optimizer(lrs=(1e-3,)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.AdamW(groups)


def _reference(step, base, warmup, total, min_lr):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _run(opt, sched, steps):
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("warmup,expected_warmup", [(0, 0), (5, 5), (0.1, 10), (0.25, 25)])
def test_matches_reference_and_floor(warmup, expected_warmup):
    total, base, min_lr = 100, 1e-3, 1e-5
    opt = _optimizer((base,))
    lrs = _run(opt, cosine_with_warmup(opt, total, warmup_steps=warmup, min_lr=min_lr), total)
    assert resolve_warmup_steps(warmup, total) == expected_warmup
    for s, (lr,) in enumerate(lrs):
        assert lr == pytest.approx(_reference(s, base, expected_warmup, total, min_lr), rel=1e-9, abs=1e-15)
    # peak reached at the end of warmup, never below min_lr afterwards, the last step close to min_lr
    assert max(lr for (lr,) in lrs) == pytest.approx(base)
    assert min(lr for (lr,) in lrs[expected_warmup:]) >= min_lr
    assert lrs[-1][0] == pytest.approx(min_lr)


def test_per_group_floor_and_low_group():
    opt = _optimizer((1e-3, 1e-6))  # the second group's peak is below min_lr: it stays at its peak
    lrs = _run(opt, cosine_with_warmup(opt, 10, min_lr=1e-5), 10)
    assert lrs[-1][0] == pytest.approx(_reference(9, 1e-3, 0, 10, 1e-5))
    assert all(lr[1] == pytest.approx(1e-6) for lr in lrs)


def test_state_dict_resume_is_exact():
    opt = _optimizer()
    sched = cosine_with_warmup(opt, 20, warmup_steps=3, min_lr=1e-6)
    first = _run(opt, sched, 7)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    rest = _run(opt, sched, 13)

    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = _optimizer()
    opt2.load_state_dict(state["opt"])
    sched2 = cosine_with_warmup(opt2, 20, warmup_steps=3, min_lr=1e-6)
    sched2.load_state_dict(state["sched"])
    assert _run(opt2, sched2, 13) == rest
    assert first[0][0] == pytest.approx(1e-3 / 3)


@pytest.mark.parametrize("bad", [-1, -0.5])
def test_rejects_negative_warmup(bad):
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_with_warmup(_optimizer(), 10, warmup_steps=bad)
