"""Batched generation with a KV cache from the model being trained (or a loaded one), for code evaluation.

    prompts (token ids from ChatFormat.prompt_ids, the training format)
      -> sorted by length, left-padded batches of ``batch_size``
      -> transformers' ``generate`` (KV cache; greedy, or temperature / top-p sampling), stopping at the EOS
      -> per prompt: the new ids before the EOS, and whether the EOS came

The model may be an ``MFTModel`` in training (LoRA applied, not merged; put in eval mode and back, no grad) or a
plain transformers model (``mft generate``, ``mft eval`` on an exported directory): both run the same code, so
greedy tokens agree between the in-training model and its export. A training attention that cannot use a KV cache
(``sdpa_varlen``, ``varlen_attn``) or would run unfused (``flex_attention``) is swapped for ``sdpa`` while
generating (``attention.kv_cache_attention``).

Under FSDP2 every rank must run the same forwards (each layer's all-gather is collective): ranks call
:func:`generate_batched` with the same ``min_batches`` (padding with throw-away batches), and transformers'
``synced_gpus`` keeps each batch decoding until every rank's sequences have ended.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mft_components.distributed import is_distributed
from mft_components.models.attention import kv_cache_attention
from mft_components.models.parallelize import reshard

__all__ = ["Generated", "generate_batched", "batches_needed"]


@dataclass
class Generated:
    """One answer: ``new_ids`` before the EOS; ``finished`` is True when the EOS was produced."""

    new_ids: list[int] = field(default_factory=list)
    finished: bool = False


def batches_needed(num_prompts: int, batch_size: int) -> int:
    return math.ceil(num_prompts / batch_size)


@contextlib.contextmanager
def _intra_op_threads(n: int | None):
    """torch's intra-op threads set to ``n`` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _generation_config(hf_model, *, eos_token_id: int, pad_token_id: int, max_new_tokens: int, greedy: bool,
                       temperature: float, top_p: float):
    config = copy.deepcopy(hf_model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.eos_token_id = eos_token_id
    config.pad_token_id = pad_token_id
    config.do_sample = not greedy
    config.temperature = None if greedy else temperature
    config.top_p = None if greedy else top_p
    config.top_k = None  # only the knobs the user chose
    config.use_cache = True
    return config


@torch.no_grad()
def generate_batched(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, eos_token_id: int,
                     max_new_tokens: int = 512, greedy: bool = True, temperature: float = 0.8, top_p: float = 0.95,
                     batch_size: int = 8, pad_token_id: int | None = None, min_batches: int = 0,
                     cpu_threads: int | None = 1) -> list[Generated]:
    """Answer every prompt; returns one :class:`Generated` per prompt, in order.

    Args:
        model: an ``MFTModel`` (possibly FSDP2-sharded) or a transformers causal LM.
        prompts: token ids of each prompt (``ChatFormat.prompt_ids``).
        eos_token_id: the training EOS; generation stops there.
        max_new_tokens: generation budget per answer.
        greedy: argmax decoding; else sampling with ``temperature`` and ``top_p`` (torch's global RNG).
        batch_size: prompts decoded together.
        pad_token_id: left padding (default: the EOS; masked out either way).
        min_batches: run at least this many ``generate`` calls (FSDP2: the most any rank needs), the extra ones on
            a copy of a real batch, their answers discarded.
        cpu_threads: torch's intra-op threads while decoding on a CPU (None: leave torch's setting). Decoding runs
            thousands of small matmuls per answer, each a parallel region whose threads must all be scheduled: on
            a 2-core machine shared with other jobs, 2 threads were 17x slower than 1 (bench/RESULTS.md).
    """
    hf_model = getattr(model, "hf_model", model)
    device = next(model.parameters()).device
    pad = eos_token_id if pad_token_id is None else pad_token_id
    config = _generation_config(hf_model, eos_token_id=eos_token_id, pad_token_id=pad, max_new_tokens=max_new_tokens,
                                greedy=greedy, temperature=temperature, top_p=top_p)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    filler = batches[0] if batches else None
    out: list[Generated | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with kv_cache_attention(hf_model.config), _intra_op_threads(cpu_threads if device.type == "cpu" else None):
            for b in range(max(len(batches), min_batches)):
                idx = batches[b] if b < len(batches) else filler
                rows = [list(prompts[i]) for i in idx] if idx else [[eos_token_id]]
                width = max(map(len, rows))
                input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                ids = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                     synced_gpus=is_distributed())
                if b >= len(batches):
                    continue
                for row, i in zip(ids[:, width:].tolist(), idx):
                    finished = eos_token_id in row
                    out[i] = Generated(new_ids=row[: row.index(eos_token_id)] if finished else row, finished=finished)
    finally:
        if is_distributed():
            reshard(model)
        model.train(was_training)
    return out
