"""Deprecated name of ``mft_components.models.attention`` (the BACKENDS table, the ``auto`` choice) and
``models.packed_attention`` (mft's own packed attentions), kept for old recipes."""

import warnings

import mft_components.moved_names  # noqa: F401  (puts back the names that left modules which kept their name)
from mft_components.device import capability_reason, gpu_too_old
from mft_components.models.attention import (
    AUTO,
    AUTO_ORDER,
    BACKENDS,
    FLEX_ATTENTION,
    NO_KV_CACHE,
    AttentionBackend,
    attention_kwargs,
    known_attn_implementations,
    kv_cache_attention,
    resolve_attn_implementation,
)
from mft_components.models.packed_attention import (
    SDPA_VARLEN,
    VARLEN_ATTN,
    block_causal_block_mask,
    cu_seqlens,
    sdpa_varlen_attention_forward,
    segment_lengths,
    varlen_attention_forward,
    varlen_options,
)

__all__ = ["AUTO", "AUTO_ORDER", "BACKENDS", "FLEX_ATTENTION", "NO_KV_CACHE", "SDPA_VARLEN", "VARLEN_ATTN",
           "AttentionBackend", "attention_kwargs", "block_causal_block_mask", "capability_reason", "cu_seqlens",
           "gpu_too_old", "known_attn_implementations", "kv_cache_attention", "resolve_attn_implementation",
           "sdpa_varlen_attention_forward", "segment_lengths", "varlen_attention_forward", "varlen_options"]

warnings.warn("mft_components.attention moved to mft_components.models.attention (the backends, auto) and "
              "mft_components.models.packed_attention (mft's packed attentions); import from there",
              DeprecationWarning, stacklevel=2)
