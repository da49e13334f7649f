"""Tests for mft_components/data/packing.py: best-fit-decreasing packing, the collator, and packed attention.

The reference for "attention never crosses samples" is a tiny random transformers model run on each sample
alone; the packed micro-batch must give the same logits at every real token, for sdpa and eager.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mft_components.data.dataset import Sample
from mft_components.data.packing import collate, pack_lengths, pack_samples, packing_efficiency
from tests.reference_masks import block_causal_mask, flash_attention_kwargs
from tests.tiny_models import TINY_CONFIGS


def make_sample(ids, mask, task_id=0):
    return Sample(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool), task_id)


def random_samples(n, max_len, vocab=100, tasks=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, max_len + 1))
        out.append(make_sample(rng.integers(0, vocab, length), rng.random(length) < 0.6, int(rng.integers(tasks))))
    return out


# ---------------------------------------------------------------------------------------------------------------
# pack_samples


def naive_best_fit_decreasing(lengths, capacity):
    """O(n * rows) reference: longest first, into the row with the least room that fits."""
    fills = []
    for n in sorted(lengths, reverse=True):
        fits = [(capacity - f, r) for r, f in enumerate(fills) if capacity - f >= n]
        if fits:
            fills[min(fits)[1]] += n
        else:
            fills.append(n)
    return sorted(fills)


@pytest.mark.parametrize("seq_len", [16, 64, 2048])
def test_pack_keeps_every_sample_once_and_fits(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(1, seq_len + 1, size=500)
    rows = pack_lengths(lengths, seq_len)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))  # no sample lost, none duplicated, last partial row kept
    assert all(lengths[r].sum() <= seq_len for r in rows)
    # same fill levels as the quadratic textbook algorithm (tie-breaking between equal rooms cannot change them)
    assert sorted(int(lengths[r].sum()) for r in rows) == naive_best_fit_decreasing(lengths.tolist(), seq_len)


def test_pack_is_deterministic_and_padding_is_one_per_row():
    samples = random_samples(200, 50)
    assert pack_samples(samples, 64) == pack_samples(samples, 64)
    assert pack_samples(samples, 64, "padding") == [[i] for i in range(200)]


def test_pack_efficiency_on_chat_like_lengths():
    # Chat-like lengths (log-normal, median ~250 tokens, long tail cut at seq_len) at seq_len 2048.
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.5, 1.0, size=20000).astype(np.int64), 1, 2048)
    rows = pack_lengths(lengths, 2048)
    eff = packing_efficiency(rows, lengths, 2048)
    assert eff >= 0.95, eff
    assert packing_efficiency(pack_lengths(lengths, 2048, "padding"), lengths, 2048) < 0.25


def test_pack_errors_name_the_config_key():
    with pytest.raises(ValueError, match="data.seq_len=8"):
        pack_lengths([3, 9], 8)
    with pytest.raises(ValueError, match="data.packing"):
        pack_lengths([3], 8, "bucket")


# ---------------------------------------------------------------------------------------------------------------
# collate on a hand-made example (the picture in packing.py's docstring)


def test_collate_hand_made_packed_row():
    a = make_sample([10, 11, 12, 13], [0, 0, 1, 1], task_id=2)
    b = make_sample([20, 21, 22, 23, 24], [0, 0, 1, 1, 1], task_id=0)
    c = make_sample([30, 31], [0, 1], task_id=1)
    batch = collate([[a, b], [c], None], pad_to=12, pad_id=7)
    assert set(batch) == {"input_ids", "labels", "position_ids", "sample_ids", "task_ids"}
    assert all(t.dtype == torch.int64 and t.shape == (3, 12) for t in batch.values())
    P = -100
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 13, 20, 21, 22, 23, 24, 7, 7, 7]
    assert batch["labels"][0].tolist() == [P, 12, 13, P, P, 22, 23, 24, P, P, P, P]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0, 0]
    assert batch["sample_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1, -1]
    assert batch["task_ids"][0].tolist() == [2, 2, 2, 2, 0, 0, 0, 0, 0, -1, -1, -1]
    # sample ids continue across rows of the micro-batch
    assert batch["labels"][1].tolist() == [31] + [P] * 11
    assert batch["sample_ids"][1].tolist() == [2, 2] + [-1] * 10
    assert batch["task_ids"][1].tolist() == [1, 1] + [-1] * 10
    # an all-padding row
    assert batch["input_ids"][2].tolist() == [7] * 12
    assert batch["labels"][2].tolist() == [P] * 12
    assert batch["sample_ids"][2].tolist() == [-1] * 12


def test_collate_labels_match_naive_shift():
    # labels[t] == input_ids[t+1] iff t+1 is in the same sample and carries loss, for random packings
    samples = random_samples(60, 20, seed=3)
    rows = pack_samples(samples, 32)
    batch = collate([[samples[i] for i in r] for r in rows], pad_to=32)
    for b, row in enumerate(rows):
        ids = np.concatenate([samples[i].input_ids for i in row])
        mask = np.concatenate([samples[i].loss_mask for i in row])
        first = np.concatenate([np.arange(len(samples[i].input_ids)) == 0 for i in row])
        for t in range(32):
            if t + 1 < len(ids) and not first[t + 1] and mask[t + 1]:
                expected = ids[t + 1]
            else:
                expected = -100
            assert batch["labels"][b, t].item() == expected


def test_collate_padding_mode_rounds_to_multiple_of_8():
    batch = collate([[make_sample(range(11), [1] * 11)], [make_sample(range(3), [1] * 3)]])
    assert batch["input_ids"].shape == (2, 16)
    assert collate([None])["input_ids"].shape == (1, 8)  # an all-padding micro-batch still has a shape
    with pytest.raises(ValueError, match="seq_len"):
        collate([[make_sample(range(11), [1] * 11)]], pad_to=8)


# ---------------------------------------------------------------------------------------------------------------
# packed attention == sample-by-sample attention in a real transformers model


@pytest.fixture(scope="module")
def packed_case():
    # lengths chosen to include a 1-token sample, full rows, and padding
    lengths = [9, 1, 5, 13, 3, 7, 2, 11, 4]
    rng = np.random.default_rng(7)
    samples = [make_sample(rng.integers(0, 96, n), rng.random(n) < 0.7, i % 3) for i, n in enumerate(lengths)]
    rows = pack_samples(samples, 16)
    assert any(len(r) > 2 for r in rows)
    batch = collate([[samples[i] for i in r] for r in rows], pad_to=16)
    return samples, rows, batch


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_per_sample_logits(packed_case, family, attn):
    samples, rows, batch = packed_case
    torch.manual_seed(0)
    config = TINY_CONFIGS[family](96)
    config._attn_implementation = attn
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        # exactly what the models helper must do: position_ids, no attention_mask, no KV cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        explicit = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=block_causal_mask(batch["sample_ids"], torch.bool if attn == "sdpa" else torch.float32),
            use_cache=False,
        ).logits
        packed_loss = torch.nn.functional.cross_entropy(
            packed.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
        )
        ref_loss = torch.zeros(())
        for b, row in enumerate(rows):
            start = 0
            for i in row:
                ids = torch.as_tensor(samples[i].input_ids, dtype=torch.long)[None]
                ref = model(input_ids=ids).logits[0]
                n = ids.shape[1]
                torch.testing.assert_close(packed[b, start : start + n], ref, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(explicit[b, start : start + n], ref, rtol=1e-5, atol=1e-5)
                # naive loss: shift inside the sample, loss on tokens whose loss_mask is set
                target = ids[0, 1:].clone()
                target[~torch.as_tensor(samples[i].loss_mask[1:])] = -100
                ref_loss += torch.nn.functional.cross_entropy(ref[:-1], target, ignore_index=-100, reduction="sum")
                start += n
    torch.testing.assert_close(packed_loss, ref_loss, rtol=1e-5, atol=1e-5)


def test_block_causal_mask_matches_docstring_picture():
    batch = collate([[make_sample(range(4), [1] * 4), make_sample(range(5), [1] * 5)]], pad_to=12)
    mask = block_causal_mask(batch["sample_ids"])[0, 0].int()
    expected = torch.zeros(12, 12, dtype=torch.int32)
    expected[:4, :4] = torch.ones(4, 4).tril()
    expected[4:9, 4:9] = torch.ones(5, 5).tril()
    expected[9:, 9:] = torch.eye(3)
    assert torch.equal(mask, expected)
    additive = block_causal_mask(batch["sample_ids"], torch.bfloat16)[0, 0]
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, expected.bool())


def test_flash_attention_kwargs_mark_every_sample_and_match_transformers(packed_case):
    samples, rows, batch = packed_case
    kwargs = flash_attention_kwargs(batch["position_ids"])
    # expected boundaries from the rows themselves: each sample, then each padding token, row after row
    expected, offset = [], 0
    for row in rows:
        start = offset
        for i in row:
            expected.append(start)
            start += len(samples[i].input_ids)
        expected.extend(range(start, offset + 16))
        offset += 16
    assert kwargs["cu_seq_lens_q"].tolist() == expected + [offset]
    assert kwargs["max_length_q"] == max(len(s.input_ids) for s in samples)
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(kwargs["cu_seq_lens_q"], cu_q) and torch.equal(kwargs["cu_seq_lens_k"], cu_k)
    assert kwargs["max_length_q"] == int(max_q)
