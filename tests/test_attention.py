"""Tests for mft_components/attention.py: sdpa_varlen gives every real token of a packed micro-batch exactly the
attention of a per-sample run (reference: the same tiny transformers model run on each sample alone with sdpa),
in forward and in the gradients, and through MFTModel for packed and padded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mft_components.attention import SDPA_VARLEN, attention_kwargs, segment_lengths
from mft_components.data import Sample
from mft_components.packing import collate, pack_samples
from tests.tiny_models import TINY_CONFIGS, make_tiny_model_dir

VOCAB = 96


def make_samples(lengths, seed=7):
    rng = np.random.default_rng(seed)
    return [
        Sample(rng.integers(0, VOCAB, n).astype(np.int32), rng.random(n) < 0.7, i % 3)
        for i, n in enumerate(lengths)
    ]


@pytest.fixture(scope="module")
def packed_case():
    # a 1-token sample, full rows, rows ending in padding, and one all-padding row
    samples = make_samples([9, 1, 5, 13, 3, 7, 2, 11, 4, 16])
    rows = pack_samples(samples, 16)
    assert any(len(r) > 2 for r in rows)
    batch = collate([[samples[i] for i in r] for r in rows] + [None], pad_to=16)
    return samples, rows, batch


def tiny_model(family, attn):
    torch.manual_seed(0)
    config = TINY_CONFIGS[family](VOCAB)
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention is exercised
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)


def test_segment_lengths_per_row():
    sample_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [2] * 7, [-1] * 7, [3, 4, 5, 6, -1, -1, -1]])
    assert segment_lengths(sample_ids) == ((3, 2), (7,), (), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="padding before a sample"):
        segment_lengths(torch.tensor([[-1, 0, 0]]))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_logits_and_grads_equal_per_sample(packed_case, family):
    samples, rows, batch = packed_case
    model = tiny_model(family, SDPA_VARLEN)
    reference = tiny_model(family, "sdpa")
    reference.load_state_dict(model.state_dict())
    kwargs = attention_kwargs(batch, model.config)
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **kwargs).logits
    real = batch["sample_ids"] >= 0
    # the gradient of a loss over real tokens must match too (padding gets zeros and no gradient)
    weights = torch.randn(packed.shape, generator=torch.Generator().manual_seed(1))
    (packed * weights)[real].sum().backward()
    ref_loss = torch.zeros(())
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            ids = torch.as_tensor(samples[i].input_ids, dtype=torch.long)[None]
            n = ids.shape[1]
            ref = reference(input_ids=ids, use_cache=False).logits[0]
            torch.testing.assert_close(packed[b, start : start + n], ref, rtol=1e-5, atol=1e-5)
            ref_loss = ref_loss + (ref * weights[b, start : start + n]).sum()
            start += n
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("packing", ["pack", "padding"])
def test_mft_model_losses_and_lora_grads_match_sdpa(tmp_path, packing):
    from mft_components.models import build_model

    model_dir = make_tiny_model_dir(tmp_path / "m", family="qwen2", vocab_size=VOCAB)
    samples = make_samples([9, 1, 5, 13, 3, 7, 2, 11, 4, 16], seed=3)
    if packing == "pack":
        batch = collate([[samples[i] for i in r] for r in pack_samples(samples, 16)], pad_to=16)
    else:
        batch = collate([[s] for s in samples])
    lora = {"rank": 4, "alpha": 8, "target_modules": "all-linear"}
    results = []
    for attn in ("sdpa", SDPA_VARLEN):
        torch.manual_seed(0)
        model = build_model(model_dir, method="lora", lora=lora, dtype="fp32", attn_implementation=attn)
        with torch.no_grad():  # non-zero lora_b so that adapter gradients flow through attention
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.normal_(0, 0.02)
        token_losses, _ = model(batch)
        token_losses.sum().backward()
        results.append((token_losses.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_errors_name_what_is_missing(packed_case):
    _, _, batch = packed_case
    model = tiny_model("llama", SDPA_VARLEN)
    with pytest.raises(ValueError, match="needs segment_lengths"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    with pytest.raises(ValueError, match="attention_mask"):
        attention_kwargs({**batch, "attention_mask": torch.ones(1)}, model.config)
    assert attention_kwargs(batch, tiny_model("llama", "sdpa").config) == {}
    # without sample_ids the boundaries come from position_ids (padding tokens become 1-token samples)
    no_ids = {k: v for k, v in batch.items() if k != "sample_ids"}
    fallback = attention_kwargs(no_ids, model.config)["segment_lengths"]
    assert all(sum(row) == batch["input_ids"].shape[1] for row in fallback)
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  **attention_kwargs(batch, model.config)).logits
        b = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                  segment_lengths=fallback).logits
    real = batch["sample_ids"] >= 0
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)


def test_padding_only_micro_batch_gives_every_adapter_a_gradient(tmp_path):
    """A micro-batch of padding rows only (what fills an epoch's last step): its loss is 0, and every LoRA weight
    must still get a gradient (zeros), as with sdpa; FSDP2 needs the same set of gradients on every rank."""
    from mft_components.models import build_model

    model_dir = make_tiny_model_dir(tmp_path / "m", family="llama", vocab_size=VOCAB)
    batch = collate([None, None], pad_to=16)
    for attn in ("sdpa", SDPA_VARLEN):
        model = build_model(model_dir, method="lora", lora={"rank": 4, "target_modules": "all-linear"},
                            dtype="fp32", attn_implementation=attn)
        token_losses, _ = model(batch)
        assert token_losses.numel() == 0
        token_losses.sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and not g.any() for g in grads.values()), [n for n, g in grads.items() if g is None]
