"""Losses for multi-task fine-tuning: chunked per-token cross entropy and the weighted task loss modes.

The pipeline of one optimiser step::

    final hidden states [B, T, D] --chunked_cross_entropy--> per-token CE [N]  (N = tokens with labels != -100)
        --TaskWeightedLoss--> per-sample / per-task reduction over the GLOBAL batch --> scalar share

Only tokens that carry a loss are projected onto the vocabulary, and they are projected a chunk at a time in
float32, so a ``[tokens, vocab]`` float32 tensor never exists, neither in forward nor saved for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------------
# Chunked cross entropy
# ---------------------------------------------------------------------------------------------------------------


def _chunk_logits(h: torch.Tensor, w32: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """float32 logits of one chunk of hidden states, Gemma-2 soft-capped when ``softcap`` is set."""
    logits = h.float() @ w32.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token CE of ``h @ w.T`` computed chunk by chunk; backward recomputes each chunk's logits.

    Saves only ``h``, ``w``, ``targets`` and the per-token log-sum-exp ([N] float32), so autograd never holds
    the float32 logits of more than the chunk being (re)computed.
    """

    @staticmethod
    def forward(ctx, h, w, targets, chunk_size, softcap):
        # One float32 copy of the weight for the whole pass instead of one per chunk: [V, D] is small next to
        # [chunk, V] logits for realistic chunk sizes, and it is freed when forward returns.
        w32 = w.float()
        n = h.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _chunk_logits(h[start:end], w32, softcap)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[start:end, None]).squeeze(1)
            lse[start:end] = chunk_lse
            losses[start:end] = chunk_lse - target_logit
            del logits
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.softcap = softcap
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        h, w, targets, lse = ctx.saved_tensors
        chunk_size, softcap = ctx.chunk_size, ctx.softcap
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w32 = w.float()
        grad_h = torch.empty_like(h) if need_h else None
        grad_w32 = torch.zeros_like(w32) if need_w else None
        grad_losses = grad_losses.float()
        n = h.shape[0]
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h32 = h[start:end].float()
            logits = _chunk_logits(h32, w32, softcap)
            # d loss / d logits = softmax(logits) - onehot(target), scaled by the incoming per-token gradient.
            grad_logits = torch.exp(logits - lse[start:end, None])
            grad_logits.scatter_add_(
                1, targets[start:end, None], torch.full((end - start, 1), -1.0, device=h.device)
            )
            grad_logits.mul_(grad_losses[start:end, None])
            if softcap is not None:
                # d(tanh(x / c) * c) / dx = 1 - tanh^2(x / c) = 1 - (capped / c)^2
                grad_logits.mul_(1.0 - (logits / softcap).square())
            del logits
            if need_h:
                grad_h[start:end] = (grad_logits @ w32).to(h.dtype)
            if need_w:
                grad_w32.addmm_(grad_logits.t(), h32)
            del grad_logits
        grad_w = grad_w32.to(w.dtype) if need_w else None
        return grad_h, grad_w, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token cross entropy of ``hidden @ weight.T`` against ``labels``, for loss-carrying tokens only.

    Tokens whose label is -100 are dropped BEFORE the projection; the remaining N tokens are projected onto the
    vocabulary and scored ``chunk_size`` at a time in float32 (bf16 inputs are upcast per chunk). Backward
    recomputes each chunk's logits, so peak memory is O(chunk_size * V) float32 instead of O(N * V).
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

    Returns:
        torch.Tensor: float32 ``[N]`` losses of the tokens with ``labels != -100``, in row-major order.

    Raises:
        ValueError: on shape mismatches or a non-positive chunk size.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunked_cross_entropy: chunk_size must be a positive int, got {chunk_size}")
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
    keep = flat_labels != IGNORE_INDEX
    # Select loss tokens before projecting: prompt and padding tokens never reach the vocabulary.
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = flat_labels[keep]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"chunked_cross_entropy: labels must be -100 or in [0, {weight.shape[0]}), "
            f"got range [{int(targets.min())}, {int(targets.max())}]"
        )
    return _ChunkedCrossEntropy.apply(h, weight, targets, int(chunk_size), softcap)
