"""Mixture-of-experts models: the router's load-balancing loss over real tokens, and the expert count.

The routed experts of MoE families are fused 3-D parameters in transformers 5 (not ``nn.Linear``); their LoRA
(``target_modules: experts``, ``router``, ...) is ``expert_lora.py``. ``MFTModel.forward`` returns
``router_aux_loss``; the loss adds it times ``loss.router_aux_loss_coef`` (default: the model config's).
"""

from __future__ import annotations

import torch

__all__ = ["num_experts", "router_aux_loss"]


def num_experts(config) -> int | None:
    """The number of routed experts of a transformers config, or None for a dense model."""
    for name in ("num_experts", "num_local_experts"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


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
    if token_mask is None:
        return load_balancing_loss_func(layers, num_experts, top_k, None).float()
    mask = token_mask.reshape(1, -1)
    if mask.shape[1] != layers[0].shape[0]:
        raise ValueError(
            f"router_aux_loss: token_mask has {mask.shape[1]} tokens, router logits have {layers[0].shape[0]} rows"
        )
    # A micro-batch of padding only (a rank's share of a short step) has no real token: 0, not 0/0 = NaN. Its
    # loss is computed over all rows and multiplied by 0 (a finite value times 0: no NaN gradient, no host sync).
    any_real = mask.any()
    safe = torch.where(any_real, mask, torch.ones_like(mask)).to(torch.float32)
    return load_balancing_loss_func(layers, num_experts, top_k, safe).float() * any_real
