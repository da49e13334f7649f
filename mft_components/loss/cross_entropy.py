"""Per-token cross entropy straight from the final hidden states, a chunk of tokens at a time.

    final hidden states [B, T, D] --chunked_cross_entropy--> per-token CE [N]  (N = tokens with labels != -100)

Only tokens that carry a loss are projected onto the vocabulary, a chunk at a time, and each chunk's log-softmax
is taken in float32, so a ``[tokens, vocab]`` float32 tensor never exists, neither in forward nor saved for
backward. The projection itself runs in the model's dtype (bf16 matmuls are 2.5x faster than float32 ones on a
CPU with avx512_bf16, more on GPUs; the logits are rounded to bf16 as in transformers, torchtune and Liger) or,
with ``projection_dtype="float32"``, in float32. ``kernel="liger"`` uses liger-kernel's fused linear cross
entropy instead (CUDA). ``MFTModel.forward`` calls it, so FSDP2's root has ``lm_head`` unsharded for it; the
reduction over samples and tasks is ``task_weighted.py``.
"""

from __future__ import annotations

import torch

__all__ = ["IGNORE_INDEX", "LOSS_INDEX", "PROJECTION_DTYPES", "CROSS_ENTROPY_KERNELS", "loss_token_index",
           "check_cross_entropy_options", "chunked_cross_entropy", "check_label_range"]

IGNORE_INDEX = -100
# Batch key of the loss tokens' positions in the flattened [B*T] micro-batch, computed on the host before the batch
# goes to the device (models.prepare_batch): selecting loss tokens with a boolean mask on a GPU would make the
# host wait for the device (the result's size is data-dependent); an index of known length does not.
LOSS_INDEX = "loss_index"


def loss_token_index(labels: torch.Tensor) -> torch.Tensor:
    """int64 positions of the tokens with ``labels != -100`` in ``labels.reshape(-1)`` (row-major order)."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().reshape(-1)


PROJECTION_DTYPES = ("model", "float32")
# `loss.cross_entropy`: mft's chunked cross entropy, or liger-kernel's fused linear cross entropy (CUDA, optional
# extra `pip install 'mft[gpu]'`); both return exact per-token losses, so every loss mode and split invariance hold.
CROSS_ENTROPY_KERNELS = ("chunked", "liger")


def check_cross_entropy_options(chunk_size: int, projection_dtype: str, kernel: str, *, config: bool = False) -> None:
    """Raise ValueError naming the first of the three cross-entropy settings that is invalid: as the ``loss.*``
    config key (``config=True``: what ``TaskWeightedLoss`` checks when a config builds it), else as the argument
    of ``chunked_cross_entropy``."""
    for key, argument, valid, expected, value in (
        ("loss.chunk_size", "chunk_size", chunk_size > 0, "a positive int", chunk_size),
        ("loss.projection_dtype", "projection_dtype", projection_dtype in PROJECTION_DTYPES,
         f"one of {', '.join(PROJECTION_DTYPES)}", projection_dtype),
        ("loss.cross_entropy", "kernel", kernel in CROSS_ENTROPY_KERNELS,
         f"one of {', '.join(CROSS_ENTROPY_KERNELS)}", kernel),
    ):
        if not valid:
            raise ValueError(f"{key}: expected {expected}, got {value!r}" if config
                             else f"chunked_cross_entropy: {argument} must be {expected}, got {value!r}")


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
    check_cross_entropy_options(chunk_size, projection_dtype, kernel)
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
