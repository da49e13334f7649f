"""Tests for mft_components/models/attention.py and packed_attention.py: every backend gives every real token of a packed micro-batch exactly the
attention of a per-sample run (reference: the same tiny transformers model run on each sample alone with sdpa):
sdpa_varlen in forward and gradients and through MFTModel for packed and padded batches; sdpa, eager,
flex_attention (forward: no CPU backward) and varlen_attn's plumbing in forward. Also the boundaries (cu_seqlens,
BlockMask), varlen_attn's options per torch release, and the `auto` choice per device with its errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import numpy as np
import pytest
import torch

from mft_components.models import attention, packed_attention
from mft_components.models.attention import (
    BACKENDS,
    FLEX_ATTENTION,
    attention_kwargs,
    known_attn_implementations,
    resolve_attn_implementation,
)
from mft_components.models.packed_attention import (
    SDPA_VARLEN,
    VARLEN_ATTN,
    block_causal_block_mask,
    cu_seqlens,
    segment_lengths,
    varlen_options,
)
from mft_components.data.dataset import Sample
from mft_components.data.packing import collate, pack_samples
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


def test_direct_calls_and_errors(packed_case):
    """The transformers model called directly (no prepared boundaries, as for sdpa) takes them from position_ids;
    misuse is reported by name."""
    _, _, batch = packed_case
    model = tiny_model("llama", SDPA_VARLEN)
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
        direct = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    real = batch["sample_ids"] >= 0
    torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[real], direct[real], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        cache = model(input_ids=batch["input_ids"][:1, :4], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="KV cache.*generate with attn_implementation: sdpa"):
            model(input_ids=batch["input_ids"][:1, 4:5], position_ids=torch.tensor([[4]]), past_key_values=cache)


def test_cu_seqlens_and_block_mask_from_sample_ids():
    from torch.nn.attention.flex_attention import create_mask

    from tests.reference_masks import block_causal_mask

    sample_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [2] * 7, [-1] * 7, [3, 4, 5, 6, -1, -1, -1]])
    # every row starts a sequence; so does every sample and a row's padding
    assert cu_seqlens(sample_ids).tolist() == [0, 3, 5, 7, 14, 21, 22, 23, 24, 25, 28]
    assert cu_seqlens(sample_ids).dtype == torch.int32
    block_mask = block_causal_block_mask(sample_ids)
    dense = create_mask(block_mask.mask_mod, 4, 1, 7, 7, device="cpu")
    real = sample_ids >= 0
    # real queries see exactly their own sample's earlier tokens (the reference the sdpa path uses)
    reference = block_causal_mask(sample_ids)
    assert torch.equal(dense[:, 0][real], reference[:, 0][real])
    # padding sees earlier padding of its row only, so its softmax is never empty
    pad_rows = dense[:, 0][~real]
    assert pad_rows.any(dim=-1).all()
    assert not (dense[:, 0] & real[:, None, :] & ~real[:, :, None]).any()


def _per_sample_reference(samples, rows, reference):
    """Logits of each packed sample run alone through `reference` (sdpa), in row order."""
    out = []
    for row in rows:
        for i in row:
            ids = torch.as_tensor(samples[i].input_ids, dtype=torch.long)[None]
            out.append(reference(input_ids=ids, use_cache=False).logits[0])
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager", FLEX_ATTENTION, VARLEN_ATTN])
def test_other_backends_forward_equal_per_sample(packed_case, attn, monkeypatch):
    """Every backend's forward on a packed micro-batch gives each real token its per-sample logits. On the CPU,
    flex_attention runs forward only (torch has no CPU backward) and torch's varlen_attn not at all: its kernel
    is replaced here by causal SDPA per cu_seqlens segment, so what is checked is mft's plumbing around it
    (boundaries, flattening, head layout); tests/test_gpu.py runs the real kernel."""
    samples, rows, batch = packed_case
    if attn == VARLEN_ATTN:
        monkeypatch.setattr(packed_attention, "_varlen_kernel", _sdpa_per_segment)
    model = tiny_model("llama", attn)
    reference = tiny_model("llama", "sdpa")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **attention_kwargs(batch, model.config)).logits
        expected = _per_sample_reference(samples, rows, reference)
    real = batch["sample_ids"] >= 0
    torch.testing.assert_close(packed[real], torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_flex_attention_reads_grouped_kv_heads_in_the_kernel(packed_case, monkeypatch):
    """mft's flex_attention (registered under transformers' name) runs grouped-query attention inside the kernel
    (enable_gqa) when the query head count is not a power of two, where transformers' own copies the key/value
    heads out (repeat_kv; Llama-3.2-3B: 24 query heads, 8 key/value heads). Forward on the CPU: per-sample logits
    of sdpa, with repeat_kv made to fail; calls mft does not make (no BlockMask) still go to transformers'."""
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
    from transformers.integrations import flex_attention as hf_flex

    assert AttentionInterface()[FLEX_ATTENTION] is packed_attention.flex_attention_forward
    samples, rows, batch = packed_case
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=FLEX_ATTENTION)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    reference.load_state_dict(model.state_dict())

    def no_copies(*args, **kwargs):
        raise AssertionError("repeat_kv: key/value heads copied out")

    monkeypatch.setattr(hf_flex, "repeat_kv", no_copies)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **attention_kwargs(batch, model.config)).logits
        expected = _per_sample_reference(samples, rows, reference)
    real = batch["sample_ids"] >= 0
    torch.testing.assert_close(packed[real], torch.cat(expected), rtol=1e-5, atol=1e-5)
    # a plain causal batch (transformers builds its own BlockMask) gives sdpa's logits too
    monkeypatch.undo()
    ids = batch["input_ids"][:1, :8]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits,
                                   reference(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_flex_flash_backend_only_where_it_can_run():
    """auto asks for flex's FlashAttention backend only where this torch has it, its CuTe kernels are installed and
    the GPU is Hopper or newer (and a probe matched the Triton backend: tests/test_gpu.py); the printed choice
    says which backend and why. On a machine without CUDA: never."""
    reason = attention.flex_flash_reason("cuda")
    if not torch.cuda.is_available():
        assert reason is not None
    options, how = attention.flex_flash_options("cuda") if reason is not None else (None, "")
    if reason is not None:
        assert options is None and reason in how
        name, why = resolve_attn_implementation("auto", "cuda")
        assert name == FLEX_ATTENTION and f"Triton backend (FLASH: {reason})" in why
        assert "cuda" not in attention.FLEX_KERNEL_OPTIONS


def _sdpa_per_segment(q, k, v, cu, max_len, options):
    """Reference for torch's varlen_attn ([tokens, heads, dim] in, cu_seqlens): causal SDPA on each segment."""
    assert options.get("window_size") == (-1, 0) or options.get("is_causal")
    assert max_len >= int(cu.diff().max())
    if options.get("enable_gqa"):
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        outs.append(torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True, scale=options.get("scale"))
                    .transpose(0, 1))
    return torch.cat(outs)


def test_varlen_options_per_torch_signature():
    """varlen_attn's signature differs across torch releases; the options follow what this one takes."""
    v29 = frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal", "return_aux"})
    v210 = (v29 - {"is_causal"}) | {"scale", "window_size"}
    v212 = v210 | {"enable_gqa"}
    assert varlen_options(v29, 4, 2, 16, None, None) == ({"is_causal": True}, 2)
    assert varlen_options(v210, 4, 2, 16, 0.25, None) == ({"window_size": (-1, 0), "scale": 0.25}, 2)
    assert varlen_options(v212, 4, 2, 16, None, 8) == ({"window_size": (7, 0), "scale": None, "enable_gqa": True}, 1)
    assert varlen_options(v212, 4, 4, 16, None, None)[1] == 1
    with pytest.raises(ValueError, match="sliding window"):
        varlen_options(v29, 4, 4, 16, None, 8)
    with pytest.raises(ValueError, match="scale"):
        varlen_options(v29, 4, 4, 16, 0.5, None)
    assert varlen_options(v29, 4, 4, 16, 0.25, None) == ({"is_causal": True}, 1)  # 1/sqrt(16) is the default
    # and this torch's own varlen_attn takes what varlen_options gives it (the GPU machine's torch 2.11 has
    # window_size and scale, no enable_gqa; torch 2.13 adds enable_gqa)
    if packed_attention._torch_varlen_attn is not None:
        bind = inspect.signature(packed_attention._torch_varlen_attn).bind
        for heads, kv_heads, scale in ((4, 2, None), (4, 4, 0.3)):
            options, repeat = varlen_options(packed_attention._VARLEN_PARAMETERS, heads, kv_heads, 16, scale, None)
            bind(*[None] * 5, 16, 16, **options)
            assert repeat == (1 if kv_heads == heads or "enable_gqa" in options else heads // kv_heads)


def test_auto_choice_per_device_and_errors(monkeypatch):
    known = known_attn_implementations()
    for name in ("auto", "sdpa_varlen", "varlen_attn", "flex_attention", "sdpa", "eager", "flash_attention_2"):
        assert name in known
    assert resolve_attn_implementation("auto", "cpu")[0] == SDPA_VARLEN
    assert resolve_attn_implementation(None, "cpu")[0] == SDPA_VARLEN
    name, why = resolve_attn_implementation("auto", "cuda")  # only torch's features decide, not a present GPU
    assert name == FLEX_ATTENTION and "auto on cuda" in why
    # the first available candidate wins, and the printed reason names what was skipped
    monkeypatch.setitem(BACKENDS, FLEX_ATTENTION, dataclasses.replace(BACKENDS[FLEX_ATTENTION], missing=lambda: "gone"))
    name, why = resolve_attn_implementation("auto", "cuda")
    assert name == VARLEN_ATTN and "flex_attention: gone" in why
    assert resolve_attn_implementation("sdpa", "cpu")[0] == "sdpa"
    with pytest.raises(ValueError, match="unknown 'sdpa2'; expected auto or one of flex_attention"):
        resolve_attn_implementation("sdpa2", "cpu")
    with pytest.raises(ValueError, match="varlen_attn trains on cuda only.*use auto \\(here: sdpa_varlen\\)"):
        resolve_attn_implementation("varlen_attn", "cpu")
    with pytest.raises(ValueError, match="flex_attention cannot run here: gone"):
        resolve_attn_implementation("flex_attention", "cuda")
    with pytest.raises(ValueError, match="cannot give packed-sample boundaries"):
        resolve_attn_implementation("paged|eager", "cuda")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="flash_attn package is not installed"):
            resolve_attn_implementation("flash_attention_2", "cuda")


def test_build_model_prints_its_choice(tmp_path, capsys):
    from mft_components.models import build_model

    model = build_model(make_tiny_model_dir(tmp_path / "m", family="llama", vocab_size=VOCAB), dtype="fp32")
    out = capsys.readouterr().out
    assert "[mft] attention: auto on cpu: causal SDPA once per sample" in out
    assert "[mft] compile: nothing compiled (auto on cpu)" in out
    assert model.config._attn_implementation == SDPA_VARLEN and model.compile_scope == "off"


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


def test_kernels_name_the_gpu_they_need():
    """FlashAttention kernels (varlen_attn, flash-attn 2) need Ampere, flash-attn 3 Hopper, bf16 Ampere: on an
    older GPU `auto` passes them over with this reason, and an explicit choice (or dtype: bf16) stops the run."""
    from mft_components.device import capability_reason

    assert capability_reason("varlen_attn", (8, 0), (9, 0), "NVIDIA H200") is None
    assert capability_reason("varlen_attn", (8, 0), (8, 0), "NVIDIA A100") is None
    assert capability_reason("varlen_attn", (8, 0), (7, 5), "Tesla T4") == (
        "varlen_attn needs a GPU of compute capability 8.0 or newer (this one: Tesla T4, 7.5)")
    assert capability_reason("flash_attention_3", (9, 0), (8, 6), "RTX 3090") is not None
