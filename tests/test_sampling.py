"""Tests for mft_components/data/sampling.py: task balancing, the ranks x micro-batches split, and exact resume.

Ranks are simulated in-process by building the loader once per rank. Every sample carries its own index as its
first token, so a batch tells which samples it holds.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mft_components.data.dataset import MFTData, Sample
from mft_components.data.sampling import (
    build_train_loader,
    build_valid_loader,
    epoch_order,
    micro_batch_rows,
    task_probabilities,
)
from mft_components.data.templates import ChatFormat

TASKS = ["code", "sql", "chat"]
ID_BASE = 1000  # first token of sample i is ID_BASE + i


def make_samples(sizes=(40, 15, 5), max_len=24, seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for task, size in enumerate(sizes):
        for _ in range(size):
            n = int(rng.integers(2, max_len + 1))
            ids = np.concatenate([[ID_BASE + len(samples)], rng.integers(0, 100, n - 1)]).astype(np.int32)
            samples.append(Sample(ids, rng.random(n) < 0.5, task))
    return samples


DATA_OPTIONS = ("seq_len", "packing", "task_sampling", "temperature", "seed", "pad_id")


def dataset(samples, **options) -> MFTData:
    """An MFTData holding ``samples`` as both its training and its validation samples."""
    return MFTData(task_names=TASKS, chat_format=ChatFormat(), train_samples=samples, valid_samples=samples, **options)


def train_loader(samples, **kw):
    """``build_train_loader`` over ``dataset(samples)``; the data options among ``kw`` go to the dataset."""
    options = {k: kw.pop(k) for k in DATA_OPTIONS if k in kw}
    return build_train_loader(dataset(samples, **options), **kw)


def sample_ids_in(batch):
    """Sample indices in a batch, row by row (a list per row; [] for an all-padding row)."""
    starts = (batch["position_ids"] == 0) & (batch["sample_ids"] >= 0)
    return [(batch["input_ids"][b][starts[b]] - ID_BASE).tolist() for b in range(batch["input_ids"].shape[0])]


def run_epoch(samples, world_size, gas, epoch=0, mbs=2, **kw):
    """Per rank, the list of micro-batches (each a list of rows of sample indices)."""
    kw = {"seq_len": 32, "seed": 5, **kw}
    out = []
    for rank in range(world_size):
        loader = train_loader(
            samples, micro_batch_size=mbs, gradient_accumulation_steps=gas, rank=rank, world_size=world_size,
            **kw,
        )
        loader.sampler.set_epoch(epoch)
        out.append([sample_ids_in(b) for b in loader])
    return out


def rows_per_step(per_rank, gas):
    """Sorted multiset of rows (as tuples) of each optimizer step, over all ranks and micro-batches."""
    steps = len(per_rank[0]) // gas
    return [
        sorted(tuple(row) for r in per_rank for mb in r[s * gas : (s + 1) * gas] for row in mb) for s in range(steps)
    ]


# ---------------------------------------------------------------------------------------------------------------
# task balancing


def test_proportional_is_a_permutation_deterministic_by_seed_and_epoch():
    task_ids = np.repeat([0, 1, 2], [40, 15, 5])
    a = epoch_order(task_ids, 3, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(60))
    assert np.array_equal(a, epoch_order(task_ids, 3, seed=1, epoch=0))
    assert not np.array_equal(a, epoch_order(task_ids, 3, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(task_ids, 3, seed=2, epoch=0))


@pytest.mark.parametrize("mode,temperature", [("uniform", None), ("temperature", 2.0), ("temperature", 1.0)])
def test_sampled_task_frequencies(mode, temperature):
    sizes = np.array([800, 150, 50])
    task_ids = np.repeat(np.arange(3), sizes)
    expected = {
        "uniform": np.full(3, 1 / 3),
        "temperature": sizes ** (1 / (temperature or 1)) / (sizes ** (1 / (temperature or 1))).sum(),
    }[mode]
    np.testing.assert_allclose(task_probabilities(sizes, mode, temperature), expected)
    epochs = 20
    counts = np.zeros(3)
    for epoch in range(epochs):
        order = epoch_order(task_ids, 3, task_sampling=mode, temperature=temperature, seed=0, epoch=epoch)
        assert len(order) == sizes.sum()
        drawn = task_ids[order]
        counts += np.bincount(drawn, minlength=3)
        # a task drawn k times uses its samples in reshuffled passes: use counts differ by at most one
        for t in range(3):
            uses = np.bincount(order[drawn == t] - (sizes[:t].sum()), minlength=sizes[t])
            assert uses.max() - uses.min() <= 1
    n = epochs * sizes.sum()
    std = np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(counts - n * expected) < 5 * std), (counts / n, expected)


def test_task_sampling_errors_name_the_config_key():
    with pytest.raises(ValueError, match="data.temperature"):
        task_probabilities([3, 4], "temperature", None)
    with pytest.raises(ValueError, match="data.task_sampling"):
        task_probabilities([3, 4], "sqrt")


# ---------------------------------------------------------------------------------------------------------------
# ranks x micro-batches split


@pytest.mark.parametrize("num_rows", [0, 1, 7, 16, 37])
def test_micro_batch_rows_split_invariance(num_rows):
    mbs, g = 2, 8
    unions = {}
    for world_size, gas in [(1, 4), (2, 2), (4, 1)]:
        per_rank = [
            micro_batch_rows(num_rows, micro_batch_size=mbs, gradient_accumulation_steps=gas, rank=r,
                             world_size=world_size)
            for r in range(world_size)
        ]
        assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) % gas == 0
        steps = len(per_rank[0]) // gas
        assert steps == -(-num_rows // g)
        unions[world_size] = [
            sorted(np.concatenate([p[s * gas : (s + 1) * gas].ravel() for p in per_rank]).tolist())
            for s in range(steps)
        ]
        real = np.concatenate([p.ravel() for p in per_rank])
        real = real[real >= 0]
        assert sorted(real.tolist()) == list(range(num_rows))  # each row exactly once, no duplicates
    assert unions[1] == unions[2] == unions[4]


@pytest.mark.parametrize("packing", ["pack", "padding"])
@pytest.mark.parametrize("mode", ["proportional", "uniform"])
def test_loader_same_step_rows_for_1x4_2x2_4x1(packing, mode):
    samples = make_samples()
    results = {}
    for world_size, gas in [(1, 4), (2, 2), (4, 1)]:
        per_rank = run_epoch(samples, world_size, gas, packing=packing, task_sampling=mode)
        assert len({len(r) for r in per_rank}) == 1 and len(per_rank[0]) % gas == 0
        loader = train_loader(samples, seq_len=32, seed=5, packing=packing, task_sampling=mode,
                                    micro_batch_size=2, gradient_accumulation_steps=gas, world_size=world_size)
        assert loader.sampler.steps_per_epoch(0) * gas == len(per_rank[0])
        results[world_size] = rows_per_step(per_rank, gas)
        seen = Counter(i for r in per_rank for mb in r for row in mb for i in row)
        assert sum(seen.values()) == len(samples)
        if mode == "proportional":
            assert sorted(seen) == list(range(len(samples)))  # every sample exactly once per epoch
    assert results[1] == results[2] == results[4]
    # all-padding rows only in the last step
    assert all(() not in step for step in results[1][:-1])


def test_loader_deterministic_and_epochs_differ():
    samples = make_samples()
    a = run_epoch(samples, 2, 1, epoch=0)
    assert a == run_epoch(samples, 2, 1, epoch=0)
    assert a != run_epoch(samples, 2, 1, epoch=1)
    assert a != run_epoch(samples, 2, 1, epoch=0, seed=6)


def test_packed_rows_fit_and_batches_have_fixed_length():
    samples = make_samples()
    loader = train_loader(samples, seq_len=32, micro_batch_size=3)
    for batch in loader:
        assert batch["input_ids"].shape == (3, 32)
    loader = train_loader(samples, seq_len=32, packing="padding", micro_batch_size=3)
    assert {b["input_ids"].shape[1] % 8 for b in loader} == {0}


# ---------------------------------------------------------------------------------------------------------------
# resume


def batches_as_lists(loader, limit=None):
    out = []
    for batch in loader:
        out.append({k: v.tolist() for k, v in batch.items()})
        if limit is not None and len(out) == limit:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_rest(num_workers):
    samples = make_samples()
    kw = dict(seq_len=32, micro_batch_size=2, gradient_accumulation_steps=2, rank=1, world_size=2, seed=3,
              task_sampling="temperature", temperature=2.0, num_workers=num_workers)
    full = train_loader(samples, **kw)
    full.sampler.set_epoch(1)
    expected = batches_as_lists(full)
    assert len(expected) >= 4

    first = train_loader(samples, **kw)
    first.sampler.set_epoch(1)
    head = batches_as_lists(first, limit=3)
    state = first.state_dict()

    resumed = train_loader(samples, **kw)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert head + batches_as_lists(resumed) == expected


def test_resume_at_epoch_end_moves_on_to_the_next_epoch():
    samples = make_samples()
    kw = dict(seq_len=32, micro_batch_size=2, seed=3)
    ref = train_loader(samples, **kw)
    ref.sampler.set_epoch(1)
    epoch1 = batches_as_lists(ref)

    # saved after the last batch, before the loop saw StopIteration: the recipe is still in epoch 0
    loader = train_loader(samples, **kw)
    n = len(loader.sampler)
    batches_as_lists(loader, limit=n)
    state = loader.state_dict()
    resumed = train_loader(samples, **kw)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(0)
    assert batches_as_lists(resumed) == []
    resumed.sampler.set_epoch(1)
    assert batches_as_lists(resumed) == epoch1

    # saved after the epoch loop ended: the recipe resumes with set_epoch(1)
    loader = train_loader(samples, **kw)
    batches_as_lists(loader)
    state = loader.state_dict()
    resumed = train_loader(samples, **kw)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert batches_as_lists(resumed) == epoch1


def test_resume_with_another_split_of_the_same_global_batch():
    samples = make_samples(sizes=(60, 30, 10))
    kw = dict(seq_len=32, micro_batch_size=1, seed=3)
    # uninterrupted 1 rank x 4 micro-batches
    full = train_loader(samples, gradient_accumulation_steps=4, **kw)
    steps = rows_per_step([[sample_ids_in(b) for b in full]], 4)
    # 2 steps on 1x4, then resume on 2 ranks x 2 micro-batches
    first = train_loader(samples, gradient_accumulation_steps=4, **kw)
    head = [sample_ids_in(b) for b in batches_as_tensors(first, 8)]
    state = first.state_dict()
    rest = []
    for rank in range(2):
        loader = train_loader(samples, gradient_accumulation_steps=2, rank=rank, world_size=2, **kw)
        loader.load_state_dict(state)
        rest.append([sample_ids_in(b) for b in loader])
    assert rows_per_step([head], 4) + rows_per_step(rest, 2) == steps

    mid_step = train_loader(samples, gradient_accumulation_steps=4, **kw)
    batches_as_tensors(mid_step, 3)
    bad = train_loader(samples, gradient_accumulation_steps=2, world_size=2, **kw)
    bad.load_state_dict(mid_step.state_dict())
    with pytest.raises(ValueError, match="optimizer-step boundary"):
        next(iter(bad))


def batches_as_tensors(loader, limit):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == limit:
            break
    return out


# ---------------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_valid_loader_each_row_on_exactly_one_rank(world_size):
    samples = make_samples(sizes=(7, 4, 2))
    per_rank = []
    for rank in range(world_size):
        loader = build_valid_loader(dataset(samples, seq_len=32), micro_batch_size=2, rank=rank, world_size=world_size)
        per_rank.append([sample_ids_in(b) for b in loader])
        assert per_rank[-1] == [sample_ids_in(b) for b in loader]  # same every time
    assert len({len(r) for r in per_rank}) == 1
    seen = sorted(i for r in per_rank for mb in r for row in mb for i in row)
    assert seen == list(range(len(samples)))
