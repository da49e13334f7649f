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


def _task_batches(vocab=1024, seed=0):
    """Three packed micro-batches of two tasks (the collator's output, on the host)."""
    import numpy as np

    from mft_components.data.dataset import Sample
    from mft_components.data.packing import collate, pack_samples

    rng = np.random.default_rng(seed)
    batches = []
    for lengths in ([9, 5, 13, 3], [7, 2, 11, 4, 16], [6, 6, 6]):
        samples = [Sample(rng.integers(0, vocab, n).astype(np.int32), rng.random(n) < 0.7, i % 2)
                   for i, n in enumerate(lengths)]
        rows = [[samples[i] for i in r] for r in pack_samples(samples, 16)][:2]
        batches.append(collate(rows + [None] * (2 - len(rows)), pad_to=16))
    return batches


def test_evaluate_prepares_batches_as_training_does(tmp_path, monkeypatch):
    """evaluate() sends each validation batch through the training path's prepare_batch (loss positions and the
    attention's boundaries from the host copy: on a GPU, no batch waits for the device) and gives the per-task
    token-mean losses of the training forward on those prepared batches."""
    from mft_components import models
    from mft_components.training.evaluate import evaluate
    from mft_components.models import build_model, prepare_batch
    from tests.tiny_models import make_tiny_model_dir

    model = build_model(make_tiny_model_dir(tmp_path / "m", family="llama", vocab_size=1024), dtype="fp32")
    batches = _task_batches()
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            prepared = prepare_batch(batch, torch.device("cpu"), model.config)
            losses, _ = model(prepared)
            tasks = batch["task_ids"][batch["labels"] != -100]
            sums.index_add_(0, tasks, losses.double())
            counts.index_add_(0, tasks, torch.ones_like(losses, dtype=torch.float64))
    calls = []
    monkeypatch.setattr(models, "prepare_batch", lambda *a, **k: calls.append(a[0]) or prepare_batch(*a, **k))
    result = evaluate(model, batches, ["a", "b"], torch.device("cpu"))
    assert [c["input_ids"] for c in calls] == [b["input_ids"] for b in batches]  # every batch, prepared
    expected = {name: float(sums[i] / counts[i]) for i, name in enumerate(["a", "b"])}
    assert result.task_loss == pytest.approx(expected, rel=1e-12)
    assert result.task_tokens == {"a": int(counts[0]), "b": int(counts[1])}
    assert result.token_loss == pytest.approx(float(sums.sum() / counts.sum()), rel=1e-12)


def test_log_step_reads_every_value_in_one_copy(monkeypatch):
    """read_log_step gives what the separate reads gave (the loss's step metrics, the gradient norm, tokens/s) from
    one device-to-host copy, and raises for a non-finite step recorded by the deferred guard."""
    from mft_components.loss import TaskWeightedLoss
    from mft_components.training.metrics import Throughput, read_log_step

    batches = _task_batches()
    loss_fn = TaskWeightedLoss(mode="task")
    loss_fn.setup(["a", "b"])
    counts = loss_fn.step_counts(batches)
    torch.manual_seed(0)
    for batch in batches:
        n = int((batch["labels"] != -100).sum())
        loss_fn(torch.rand(n) * 3, batch, counts)
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    guard = NonFiniteGuard(optimizer, ["a", "b"])
    param.grad = torch.full_like(param, 0.5)
    grad_norm = torch.nn.utils.clip_grad_norm_([param], 1.0)
    guard.update(1, loss_fn.step_loss(), grad_norm, [b["task_ids"] for b in batches])
    throughput = Throughput()
    throughput.add_step(batches)
    expected = loss_fn.step_metrics()
    copies = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: copies.append(t.shape) or tolist(t))
    metrics = read_log_step(loss_fn, grad_norm, guard, throughput)
    monkeypatch.undo()
    assert len(copies) == 1
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    assert metrics["grad_norm"] == pytest.approx(1.0) and metrics["tokens_per_s"] > 0
    guard.update(2, torch.tensor(math.nan, dtype=torch.float64), grad_norm, [b["task_ids"] for b in batches])
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 2"):
        read_log_step(loss_fn, grad_norm, guard, throughput)
