"""Tests for mft_components/loss.py against references written from the formulas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mft_components.loss import CoBa, StepCounts, TaskWeightedLoss, chunked_cross_entropy
from mft_components.models.moe import router_aux_loss

# ---------------------------------------------------------------------------------------------------------------
# chunked_cross_entropy
# ---------------------------------------------------------------------------------------------------------------


def _reference_ce(hidden, weight, labels, softcap=None):
    """Full float32 logits + F.cross_entropy, then keep labels != -100 in row-major order."""
    logits = hidden.float() @ weight.float().t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return losses[labels.reshape(-1) != -100]


def _ce_inputs(dtype=torch.float32, b=3, t=11, d=16, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.4] = -100
    labels[1] = -100  # an all-padding row is legal
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_ce_matches_full_logits(chunk_size, softcap):
    hidden, weight, labels = _ce_inputs()
    out = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk_size, softcap=softcap)
    assert out.dtype == torch.float32 and out.shape == (int((labels != -100).sum()),)
    g_out = torch.randn_like(out)  # a non-uniform upstream gradient exercises the per-token scaling
    gh, gw = torch.autograd.grad((out * g_out).sum(), (hidden, weight))

    ref = _reference_ce(hidden, weight, labels, softcap)
    rh, rw = torch.autograd.grad((ref * g_out).sum(), (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)
    assert torch.all(gh[1] == 0)  # tokens without loss get no gradient


@pytest.mark.parametrize("weight_frozen", [False, True])
def test_chunked_ce_bf16_float32_projection_is_exact(weight_frozen):
    hidden, weight, labels = _ce_inputs(dtype=torch.bfloat16, v=300, d=32)
    if weight_frozen:
        weight = weight.detach()
    out = chunked_cross_entropy(hidden, weight, labels, chunk_size=5, projection_dtype="float32")
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out.sum(), (hidden,) if weight_frozen else (hidden, weight))
    assert all(g.dtype == torch.bfloat16 for g in grads)
    # Reference: the same bf16 values upcast to float32 up front.
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = _reference_ce(h32, w32, labels)
    refs = torch.autograd.grad(ref.sum(), (h32, w32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # float32 math, not bf16 logits
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g.float(), r, rtol=1e-2, atol=1e-2)  # only the final cast to bf16 differs


@pytest.mark.parametrize("weight_frozen", [False, True])
def test_chunked_ce_bf16_model_projection_matches_bf16_logits(weight_frozen):
    """projection_dtype="model": bf16 logits, float32 log-softmax: what transformers computes for a bf16 model."""
    hidden, weight, labels = _ce_inputs(dtype=torch.bfloat16, b=4, t=64, v=3000, d=64)
    if weight_frozen:
        weight = weight.detach()
    out = chunked_cross_entropy(hidden, weight, labels, chunk_size=16)
    grads = torch.autograd.grad(out.sum(), (hidden,) if weight_frozen else (hidden, weight))
    assert out.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)

    h_ref = hidden.detach().clone().requires_grad_()
    w_ref = weight.detach().clone().requires_grad_()
    logits = (h_ref @ w_ref.t()).float()  # the transformers way: bf16 matmul, then upcast
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    ref = ref[labels.reshape(-1) != -100]
    refs = torch.autograd.grad(ref.sum(), (h_ref, w_ref))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2)

    exact = _reference_ce(hidden.detach(), weight.detach(), labels)
    assert not torch.allclose(out, exact, rtol=0, atol=1e-5)  # bf16 rounding of the logits is visible ...
    torch.testing.assert_close(out, exact, rtol=0, atol=0.1)  # ... and small


def test_chunked_ce_autograd_saves_no_logits():
    """Autograd keeps inputs + per-token log-sum-exp, never [N, V] logits (measured with saved-tensor hooks)."""
    n_tok, d, v = 64, 8, 5000
    hidden = torch.randn(n_tok, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    labels = torch.randint(0, v, (n_tok,))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_cross_entropy(hidden, weight, labels, chunk_size=8)
    logits_bytes = n_tok * v * 4
    # hidden (selected) + weight + targets + lse; weight alone is v * d * 4.
    assert sum(saved) < v * d * 4 + 4 * n_tok * (d + 4)
    assert sum(saved) < logits_bytes / 4
    out.sum().backward()


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ce_frozen_weight_gradient_computed_in_forward(softcap, dtype):
    """A frozen lm_head (LoRA): forward keeps d loss_i / d h_i, backward only scales it by the upstream gradient."""
    hidden, weight, labels = _ce_inputs(dtype=dtype)
    weight = weight.detach()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = chunked_cross_entropy(hidden, weight, labels, chunk_size=4, softcap=softcap)
    n = int((labels != -100).sum())
    assert saved[-1] == (n, hidden.shape[-1])  # the [N, D] input gradient, not the weight or logits
    g_out = torch.randn_like(out)
    (gh,) = torch.autograd.grad((out * g_out).sum(), (hidden,))
    h32 = hidden.detach().float().requires_grad_()
    ref = _reference_ce(h32, weight.float(), labels, softcap)
    (rh,) = torch.autograd.grad((ref * g_out).sum(), (h32,))
    assert gh.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gh.float(), rh, rtol=tol, atol=tol)


def test_chunked_ce_no_loss_tokens():
    hidden, weight, labels = _ce_inputs()
    labels[:] = -100
    out = chunked_cross_entropy(hidden, weight, labels)
    assert out.shape == (0,)
    out.sum().backward()
    assert torch.all(hidden.grad == 0)


def test_chunked_ce_errors():
    hidden, weight, labels = _ce_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="projection_dtype"):
        chunked_cross_entropy(hidden, weight, labels, projection_dtype="bf16")
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(hidden, weight, labels[:, :-1])
    bad = labels.clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        chunked_cross_entropy(hidden, weight, bad)


# ---------------------------------------------------------------------------------------------------------------
# TaskWeightedLoss: modes against naive references, exactness over splits
# ---------------------------------------------------------------------------------------------------------------

NUM_TASKS, HID, VOCAB = 3, 8, 29
ALL_MODES = ["token", "sample", "task", "task_sample", "coba"]


def make_global_batch(num_micro_batches=4, rows=2, seq=16, seed=0, task_pool=(0, 1, 2)):
    """Packed micro-batches in the collator's format: samples of random length and task, prompt tokens without
    loss, padding at the row end, an all-padding row in micro-batch 0; plus random hidden inputs per micro-batch."""
    g = torch.Generator().manual_seed(seed)
    micro_batches = []
    for mb in range(num_micro_batches):
        labels = torch.full((rows, seq), -100)
        sample_ids = torch.full((rows, seq), -1)
        task_ids = torch.full((rows, seq), -1)
        next_sample = 0
        for r in range(rows):
            if mb == 0 and r == rows - 1:
                continue  # all-padding row
            pos = 0
            while pos < seq - 3:
                length = int(torch.randint(3, 9, (1,), generator=g))
                length = min(length, seq - pos)
                prompt = int(torch.randint(1, length - 1, (1,), generator=g))
                task = task_pool[int(torch.randint(0, len(task_pool), (1,), generator=g))]
                sample_ids[r, pos : pos + length] = next_sample
                task_ids[r, pos : pos + length] = task
                # labels already shifted: the last token of a sample has no target inside the sample
                labels[r, pos + prompt - 1 : pos + length - 1] = torch.randint(0, VOCAB, (length - prompt,), generator=g)
                next_sample += 1
                pos += length
        x = torch.randn(rows, seq, HID, generator=g)
        micro_batches.append({"labels": labels, "sample_ids": sample_ids, "task_ids": task_ids, "x": x})
    return micro_batches


def make_params(seed=1):
    g = torch.Generator().manual_seed(seed)
    proj = (torch.randn(HID, HID, generator=g) / HID**0.5).requires_grad_()  # stands in for the decoder
    lm_head = (torch.randn(VOCAB, HID, generator=g) * 0.3).requires_grad_()
    return proj, lm_head


def token_losses_of(batch, proj, lm_head, chunk_size=5):
    return chunked_cross_entropy(batch["x"] @ proj, lm_head, batch["labels"], chunk_size=chunk_size)


def reference_loss(micro_batches, proj, lm_head, mode, weights):
    """The step loss written from the formulas on the concatenated global batch, with full logits."""
    per_token, task_of, sample_of = [], [], []
    for mb_index, batch in enumerate(micro_batches):
        logits = (batch["x"] @ proj) @ lm_head.t()
        flat = F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1), reduction="none")
        mask = batch["labels"].reshape(-1) != -100
        per_token.append(flat[mask])
        task_of += batch["task_ids"].reshape(-1)[mask].tolist()
        sample_of += [(mb_index, s) for s in batch["sample_ids"].reshape(-1)[mask].tolist()]
    losses = torch.cat(per_token)
    samples = {}
    for i, s in enumerate(sample_of):
        samples.setdefault(s, []).append(i)
    sample_mean = {s: losses[idx].mean() for s, idx in samples.items()}
    sample_task = {s: task_of[idx[0]] for s, idx in samples.items()}
    if mode == "token":
        return losses.mean()
    if mode == "sample":
        return torch.stack(list(sample_mean.values())).mean()
    total, total_w = 0.0, 0.0
    for t in sorted(set(task_of)):
        if mode == "task_sample":
            value = torch.stack([m for s, m in sample_mean.items() if sample_task[s] == t]).mean()
        else:
            value = losses[[i for i, tt in enumerate(task_of) if tt == t]].mean()
        total = total + weights[t] * value
        total_w += weights[t]
    return total / total_w


def make_loss(mode, task_weights=None):
    loss_fn = TaskWeightedLoss(mode=mode, task_weights=task_weights, coba_warmup_steps=0)
    loss_fn.setup(["py", "java", "sql"])
    if mode == "coba":  # non-uniform CoBa weights, so the test sees them used
        for step, losses in enumerate([[2.0, 3.0, 1.0], [1.5, 2.9, 1.1], [1.2, 2.5, 1.15], [1.0, 2.4, 1.3]]):
            loss_fn.update_coba(step, losses)
    return loss_fn


def run_split(loss_fn, micro_batches, proj, lm_head, ranks):
    """Emulate `ranks` ranks in one process: counts summed over ranks (the all-reduce), each rank backprops
    share * world_size, gradients averaged over ranks (FSDP). Returns (loss, grad proj, grad lm_head)."""
    per_rank = [micro_batches[r :: ranks] for r in range(ranks)]
    local = [loss_fn.step_counts(mbs) for mbs in per_rank]
    counts = StepCounts(
        tokens=sum(c.tokens for c in local), samples=sum(c.samples for c in local),
        micro_batches=sum(c.micro_batches for c in local),
    )
    loss = 0.0
    grads = [torch.zeros_like(proj), torch.zeros_like(lm_head)]
    for mbs in per_rank:
        for batch in mbs:
            share = loss_fn(token_losses_of(batch, proj, lm_head), batch, counts)
            g = torch.autograd.grad(share * ranks, (proj, lm_head))
            grads = [a + b / ranks for a, b in zip(grads, g)]
            loss += float(share.detach())
    return loss, grads


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_mode_matches_reference_for_any_split(mode, ranks):
    micro_batches = make_global_batch()
    proj, lm_head = make_params()
    task_weights = [0.5, 2.0, 1.0] if mode in ("task", "task_sample") else None
    loss_fn = make_loss(mode, task_weights)
    weights = list(loss_fn.task_weights().values())
    if mode == "coba":
        assert max(weights) - min(weights) > 0.05
    ref = reference_loss(micro_batches, proj, lm_head, mode, weights)
    ref_grads = torch.autograd.grad(ref, (proj, lm_head))
    loss, grads = run_split(loss_fn, micro_batches, proj, lm_head, ranks)
    torch.testing.assert_close(torch.tensor(loss), ref.detach(), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_mfcoder_aliases_and_errors():
    for alias, mode in [("case1", "token"), ("case2", "sample"), ("case3", "task"), ("case4", "task_sample")]:
        assert TaskWeightedLoss(mode=alias).mode == mode
    assert TaskWeightedLoss().mode == "task"
    with pytest.raises(ValueError, match="loss.mode"):
        TaskWeightedLoss(mode="case7")
    with pytest.raises(ValueError, match="loss.task_weights"):
        TaskWeightedLoss(mode="coba", task_weights=[1, 2])
    with pytest.raises(ValueError, match="loss.projection_dtype"):
        TaskWeightedLoss(projection_dtype="fp16")
    assert TaskWeightedLoss(chunk_size=8, projection_dtype="float32").ce_kwargs == {
        "chunk_size": 8, "projection_dtype": "float32", "cross_entropy": "chunked"}
    with pytest.raises(ValueError, match="unknown task"):
        TaskWeightedLoss(task_weights={"cobol": 2.0}).setup(["py", "java"])
    with pytest.raises(ValueError, match="one weight per task"):
        TaskWeightedLoss(task_weights=[1.0]).setup(["py", "java"])
    loss_fn = TaskWeightedLoss(task_weights={"java": 3.0})
    loss_fn.setup(["py", "java"])
    assert loss_fn.task_weights() == {"py": 1.0, "java": 3.0}
    with pytest.raises(RuntimeError, match="setup"):
        TaskWeightedLoss().step_counts([])


@pytest.mark.parametrize("mode", ALL_MODES)
def test_task_missing_from_step(mode):
    micro_batches = make_global_batch(task_pool=(0, 2))  # "java" (1) never appears
    proj, lm_head = make_params()
    loss_fn = make_loss(mode, [0.5, 2.0, 1.0] if mode in ("task", "task_sample") else None)
    counts = loss_fn.step_counts(micro_batches)
    assert int(counts.tokens[1]) == 0 and int(counts.samples[1]) == 0
    loss, grads = run_split(loss_fn, micro_batches, proj, lm_head, 2)
    ref = reference_loss(micro_batches, proj, lm_head, mode, list(loss_fn.task_weights().values()))
    assert torch.isfinite(torch.tensor(loss)) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(torch.tensor(loss), ref.detach(), rtol=1e-5, atol=1e-6)
    metrics = loss_fn.step_metrics()
    assert "loss/java" not in metrics and metrics["tokens/java"] == 0


def test_step_without_loss_tokens_is_zero():
    micro_batches = make_global_batch(num_micro_batches=2)
    for batch in micro_batches:
        batch["labels"][:] = -100
    proj, lm_head = make_params()
    for mode in ALL_MODES:
        loss_fn = make_loss(mode)
        loss, grads = run_split(loss_fn, micro_batches, proj, lm_head, 1)
        assert loss == 0.0 and all(torch.all(g == 0) for g in grads)


def test_step_metrics_token_mean_per_task():
    micro_batches = make_global_batch()
    proj, lm_head = make_params()
    loss_fn = make_loss("task_sample", {"py": 2.0})
    counts = loss_fn.step_counts(micro_batches)
    total = 0.0
    all_losses, all_tasks = [], []
    for batch in micro_batches:
        tl = token_losses_of(batch, proj, lm_head)
        total += float(loss_fn(tl, batch, counts).detach())
        all_losses.append(tl.detach())
        all_tasks.append(batch["task_ids"][batch["labels"] != -100])
    losses, tasks = torch.cat(all_losses), torch.cat(all_tasks)
    metrics = loss_fn.step_metrics()
    assert metrics["loss"] == pytest.approx(total, rel=1e-6)
    for t, name in enumerate(["py", "java", "sql"]):
        assert metrics[f"tokens/{name}"] == int((tasks == t).sum())
        assert metrics[f"loss/{name}"] == pytest.approx(float(losses[tasks == t].mean()), rel=1e-6)
    assert metrics["weight/py"] == 2.0 and metrics["weight/sql"] == 1.0


def test_token_losses_shape_checked():
    micro_batches = make_global_batch(num_micro_batches=1)
    loss_fn = make_loss("task")
    counts = loss_fn.step_counts(micro_batches)
    with pytest.raises(ValueError, match="labels != -100"):
        loss_fn(torch.zeros(3), micro_batches[0], counts)


def test_split_invariance_two_ranks_torchrun():
    from tests.conftest import run_torchrun

    proc = run_torchrun(Path(__file__).parent / "dist" / "loss_split.py", nproc=2, timeout=120)
    assert "loss_split OK" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# CoBa
# ---------------------------------------------------------------------------------------------------------------


def _np_softmax(v):
    e = np.exp(v - np.max(v))
    return e / e.sum()


def reference_coba(steps, losses, warmup, history, tau):
    """The CoBa formulas (paper / class docstring) on a whole synthetic history with numpy; weights per update."""
    losses = np.asarray(losses, dtype=np.float64)
    k = losses.shape[1]
    y = losses / losses[0]
    task_slopes, max_slopes, out = [], [], []
    w = np.full(k, 1.0 / k)
    for u, step in enumerate(steps):
        if step >= warmup:
            lo = max(0, u - history + 1)
            x, window = np.asarray(steps[lo : u + 1], dtype=np.float64), y[lo : u + 1]
            fit = lambda col: np.polyfit(x, col, 1)[0] if len(x) >= 2 else 0.0  # noqa: E731
            a = np.array([fit(window[:, i]) for i in range(k)])
            task_slopes.append(a)
            max_slopes.append(fit(window.max(axis=1)))
            rcs = _np_softmax(k * a / np.abs(a).sum()) if np.abs(a).sum() > 0 else np.full(k, 1.0 / k)
            hist = np.stack(task_slopes[-history:])
            n = len(hist)
            denom = np.abs(hist).sum(axis=0)
            acs = _np_softmax(np.where(denom > 0, -n * a / np.where(denom > 0, denom, 1), 0.0))
            ms = np.asarray(max_slopes)
            m = len(ms)
            df = min(1.0, m * _np_softmax(-tau * m * ms / np.abs(ms).sum())[-1]) if np.abs(ms).sum() > 0 else 1.0
            w = _np_softmax(k * (df * rcs + (1 - df) * acs))
            floor = 1.0 / (10 * k)
            if w.min() < floor:
                w = (1 - k * floor) * w + floor
        out.append(w.copy())
    return out


def synthetic_histories(num_updates=120, turn=60, seed=0):
    """Validation losses of 3 tasks: A keeps falling, B falls then stalls at `turn`, C falls then rises."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_updates, dtype=np.float64)
    a = 2.0 * np.exp(-t / 40) + 0.5
    b_t = np.minimum(t, turn)
    b = 3.0 * np.exp(-b_t / 40) + 0.6
    c = 1.5 * np.exp(-np.minimum(t, turn) / 40) + 0.4 + 0.01 * np.maximum(t - turn, 0)
    noise = 1 + 0.002 * rng.standard_normal((num_updates, 3))
    return np.stack([a, b, c], axis=1) * noise


def test_coba_matches_reference_formulas():
    losses = synthetic_histories()
    warmup, history, tau = 10, 25, 5.0
    loss_fn = TaskWeightedLoss(mode="coba", coba_warmup_steps=warmup, coba_history_length=history, coba_tau=tau)
    loss_fn.setup(["a", "b", "c"])
    steps = list(range(len(losses)))
    ref = reference_coba(steps, losses, warmup, history, tau)
    for step, row, expected in zip(steps, losses, ref):
        got = loss_fn.update_coba(step, {"a": row[0], "b": row[1], "c": row[2]})
        np.testing.assert_allclose(list(got.values()), expected, rtol=1e-9, atol=1e-12)


def test_coba_downweights_stalling_and_rising_tasks():
    losses = synthetic_histories(num_updates=140, turn=60)
    loss_fn = TaskWeightedLoss(mode="coba", coba_warmup_steps=10, coba_history_length=40)
    loss_fn.setup(["a", "b", "c"])
    weights = []
    for step, row in enumerate(losses):
        if step < 10:  # uniform before warmup
            assert loss_fn.task_weights() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
        weights.append(list(loss_fn.update_coba(step, row.tolist()).values()))
    weights = np.asarray(weights)
    assert np.all(weights >= 1 / 30) and np.allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    before, after = weights[40:58].mean(axis=0), weights[70:100].mean(axis=0)  # all falling | B stalled, C rising
    assert np.ptp(before) < 0.01  # similar convergence -> near-uniform
    assert after[2] < after[1] < after[0]  # the rising task loses most, the stalled one loses to the falling one
    assert after[2] < before[2] and after[1] < before[1]
    assert np.all(weights[66:120].argmin(axis=1) == 2)


def test_coba_floor_mixes_with_uniform():
    """One task falling, five diverging: the raw softmax drops below 1/(10K); the floor lifts it, sum stays 1."""
    k = 6
    t = np.arange(60.0)
    losses = np.stack([2 - 0.01 * t] + [1 + 0.02 * np.maximum(t - 20, 0) * (i + 1) for i in range(k - 1)], axis=1)
    loss_fn = TaskWeightedLoss(mode="coba", coba_warmup_steps=5, coba_history_length=10)
    loss_fn.setup([f"t{i}" for i in range(k)])
    floored = 0
    for step, row in enumerate(losses):
        w = np.asarray(list(loss_fn.update_coba(step, row.tolist()).values()))
        assert w.min() >= 1 / (10 * k) and w.sum() == pytest.approx(1.0, abs=1e-12)
        raw = loss_fn.coba.last.get("raw")
        if raw is not None and min(raw) < 1 / (10 * k):
            floored += 1
            np.testing.assert_allclose(w, 0.9 * np.asarray(raw) + 0.1 / k, rtol=1e-12)
    assert floored > 0 and w.argmax() == 0


def test_coba_state_dict_resume_is_exact(tmp_path):
    losses = synthetic_histories(num_updates=80)
    make = lambda: TaskWeightedLoss(mode="coba", coba_warmup_steps=5, coba_history_length=15)  # noqa: E731
    full, resumed = make(), make()
    full.setup(["a", "b", "c"])
    resumed.setup(["a", "b", "c"])
    for step in range(40):
        full.update_coba(step, losses[step].tolist())
    torch.save(full.state_dict(), tmp_path / "loss.pt")
    resumed.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    assert resumed.task_weights() == full.task_weights()
    for step in range(40, 80):
        assert resumed.update_coba(step, losses[step].tolist()) == full.update_coba(step, losses[step].tolist())
    with pytest.raises(ValueError, match="loss.mode"):
        TaskWeightedLoss(mode="task").load_state_dict(full.state_dict())


def test_coba_missing_validation_task_and_interval():
    loss_fn = TaskWeightedLoss(mode="coba", coba_warmup_steps=2, coba_update_interval=3)
    loss_fn.setup(["a", "b"])
    assert [loss_fn.coba_due(s) for s in range(5)] == [True, False, False, True, False]
    for step in range(10):
        w = loss_fn.update_coba(step, {"a": 2.0 - 0.1 * step})  # "b" has no validation data
        assert all(math.isfinite(x) for x in w.values()) and sum(w.values()) == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="coba"):
        make_loss("task").update_coba(0, [1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------------------------
# MoE router auxiliary loss
# ---------------------------------------------------------------------------------------------------------------


def reference_router_aux(layers, num_experts, top_k, mask):
    """Switch Transformer eq. (4)-(6) / Mixtral: E * sum_e f_e * P_e over the real tokens of all layers."""
    logits = torch.cat([l.reshape(-1, num_experts) for l in layers])
    keep = mask.reshape(-1).repeat(len(layers))
    probs = torch.softmax(logits[keep].float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    f = torch.stack([(chosen == e).sum() for e in range(num_experts)]).float() / probs.shape[0]
    return num_experts * (f * probs.mean(0)).sum()


def test_router_aux_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(2, 7, 6, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False  # padding
    got = router_aux_loss(layers, num_experts=6, top_k=2, token_mask=mask)
    torch.testing.assert_close(got, reference_router_aux(layers, 6, 2, mask))
    got.backward()
    assert all(l.grad is not None and torch.all(l.grad[1, 4:] == 0) for l in layers)  # padding gets no gradient
    all_real = router_aux_loss(layers, 6, 2, None)
    flat = tuple(l.reshape(-1, 6) for l in layers)
    torch.testing.assert_close(all_real, load_balancing_loss_func(flat, 6, 2))
    torch.testing.assert_close(all_real, reference_router_aux(layers, 6, 2, torch.ones(2, 7, dtype=torch.bool)))


def test_router_aux_loss_added_per_micro_batch():
    micro_batches = make_global_batch(num_micro_batches=2)
    proj, lm_head = make_params()
    loss_fn = TaskWeightedLoss(mode="token", router_aux_loss_coef=0.01)
    loss_fn.setup(["py", "java", "sql"])
    counts = loss_fn.step_counts(micro_batches)
    aux = [torch.tensor(1.5), torch.tensor(2.5)]
    total = sum(float(loss_fn(token_losses_of(b, proj, lm_head), b, counts, aux_loss=a).detach())
                for b, a in zip(micro_batches, aux))
    ref = reference_loss(micro_batches, proj, lm_head, "token", None)
    assert total == pytest.approx(float(ref) + 0.01 * 2.0, rel=1e-6)
    assert loss_fn.step_metrics()["aux_loss"] == pytest.approx(0.02)


def test_liger_cross_entropy_switch_errors():
    """loss.cross_entropy: liger is checked where it is set (tests/test_gpu.py compares it with chunked on CUDA)."""
    import importlib.util

    with pytest.raises(ValueError, match="loss.cross_entropy: expected one of chunked, liger"):
        TaskWeightedLoss(cross_entropy="fused")
    h, w, labels = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    with pytest.raises(ValueError, match="kernel must be one of"):
        chunked_cross_entropy(h, w, labels, kernel="fused")
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ValueError, match=r"needs the liger-kernel package \(pip install 'mft\[gpu\]'\)"):
            TaskWeightedLoss(cross_entropy="liger")
    with pytest.raises(ValueError, match="liger runs on CUDA only"):
        chunked_cross_entropy(h, w, labels, kernel="liger")


def test_coba_reference_normalises_the_curves():
    """With a reference (the whole validation split before training), each task's curve is its loss over that
    reference, not over its first sampled loss; a task without a reference falls back to its first loss."""
    loss_fn = TaskWeightedLoss(mode="coba", coba_warmup_steps=100)
    loss_fn.setup(["a", "b"])
    loss_fn.set_coba_reference({"a": 2.0})  # "b" had no validation tokens before training
    loss_fn.update_coba(1, {"a": 1.5, "b": 4.0})
    loss_fn.update_coba(2, {"a": 1.0, "b": 2.0})
    assert loss_fn.coba.history == [[0.75, 1.0], [0.5, 0.5]]
    TaskWeightedLoss(mode="task").set_coba_reference({"a": 2.0})  # not CoBa: nothing to do
