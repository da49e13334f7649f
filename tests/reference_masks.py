"""Reference attention masks of a packed micro-batch, written out plainly for the tests to compare with.

``block_causal_mask`` is the explicit block-diagonal causal mask of the picture in mft_components/data/packing.py;
``flash_attention_kwargs`` the varlen boundaries transformers' flash-attention path derives from ``position_ids``.
mft's attentions never build either (they take their boundaries from ``sample_ids``: models/packed_attention.py).
"""

from __future__ import annotations

import torch


def block_causal_mask(sample_ids: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The explicit block-diagonal causal mask ``[B, 1, T, T]`` of a batch (the picture in the module docstring).

    Not needed with transformers' own models (they derive it from ``position_ids``); for attention code that
    wants a ready 4D mask. Each padding token (sample id -1) attends to itself only, so no row is empty.

    Args:
        sample_ids: int64 ``[B, T]`` from ``collate``.
        dtype: ``torch.bool`` (True = attend; for ``sdpa``) or a float dtype, giving an additive mask of 0 and
            the dtype's minimum (for ``eager``, which ADDS the mask to the scores: never give it a bool mask).

    Returns:
        torch.Tensor: ``[B, 1, T, T]``.
    """
    t = sample_ids.shape[-1]
    same = sample_ids[:, :, None] == sample_ids[:, None, :]
    pad = sample_ids < 0
    # padding tokens share id -1; keep only their diagonal
    same &= ~(pad[:, :, None] | pad[:, None, :]) | torch.eye(t, dtype=torch.bool, device=sample_ids.device)
    mask = (same & torch.ones(t, t, dtype=torch.bool, device=sample_ids.device).tril())[:, None]
    if dtype == torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def flash_attention_kwargs(position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Varlen boundaries of a packed micro-batch for ``attn_implementation="flash_attention_2"``.

    transformers' flash-attention path flattens the batch to ``B*T`` tokens and uses these instead of inferring
    them (which it only does for ``B == 1``). A sequence starts wherever ``position_ids`` is 0: at every sample and
    at every padding token. Call it on the device tensor, once per micro-batch, and pass the result as keyword
    arguments: ``hf_model(input_ids=..., position_ids=..., use_cache=False, **flash_attention_kwargs(pos))``.

    Args:
        position_ids: int64 ``[B, T]`` from ``collate``.

    Returns:
        dict[str, torch.Tensor]: ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32, starts of the sequences in the
        flattened batch plus ``B*T``) and ``max_length_q`` / ``max_length_k`` (the longest sequence).
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).to(torch.int32)
    cu_seq_lens = torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])
    max_length = int(cu_seq_lens.diff().max()) if flat.numel() else 0
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
