"""Tests for mft_components/loss.py against references written from the formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mft_components.loss import chunked_cross_entropy

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


def test_chunked_ce_bf16_inputs_computed_in_float32():
    hidden, weight, labels = _ce_inputs(dtype=torch.bfloat16, v=300, d=32)
    out = chunked_cross_entropy(hidden, weight, labels, chunk_size=5)
    assert out.dtype == torch.float32
    gh, gw = torch.autograd.grad(out.sum(), (hidden, weight))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # Reference: the same bf16 values upcast to float32 up front.
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = _reference_ce(h32, w32, labels)
    rh, rw = torch.autograd.grad(ref.sum(), (h32, w32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # float32 math, not bf16 logits
    torch.testing.assert_close(gh.float(), rh, rtol=1e-2, atol=1e-2)  # only the final cast to bf16 differs
    torch.testing.assert_close(gw.float(), rw, rtol=1e-2, atol=1e-2)


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


def test_chunked_ce_only_grads_needed():
    hidden, weight, labels = _ce_inputs()
    weight = weight.detach()  # a frozen lm_head (LoRA): only hidden needs a gradient
    out = chunked_cross_entropy(hidden, weight, labels, chunk_size=4)
    (gh,) = torch.autograd.grad(out.sum(), (hidden,))
    ref = _reference_ce(hidden, weight, labels)
    (rh,) = torch.autograd.grad(ref.sum(), (hidden,))
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-5)


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
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(hidden, weight, labels[:, :-1])
    bad = labels.clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        chunked_cross_entropy(hidden, weight, bad)
