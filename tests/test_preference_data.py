"""Preference records, tokenisation, truncation and packing of pairs (data/preference_records.py, preference.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mft_components.data.build import build_mft_data
from mft_components.data.preference import build_preference_data, collate_pairs, truncate_pair
from mft_components.data.preference_records import parse_preference_record
from mft_components.data.records import BadRecord, DataError
from mft_components.data.sampling import build_train_loader

XXPO = {"chosen": [{"role": "human", "content": "Add 1 and 2."}, {"role": "bot", "content": "3"}],
        "rejected": [{"role": "human", "content": "Add 1 and 2."}, {"role": "bot", "content": "4"}]}
TRL_TEXT = {"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4"}
TRL_CHAT = {"prompt": [{"role": "user", "content": "Add 1 and 2."}],
            "chosen": [{"role": "assistant", "content": "3"}], "rejected": [{"role": "assistant", "content": "4"}]}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_shapes_agree():
    expected = ([{"role": "user", "content": "Add 1 and 2."}], "3", "4")
    assert parse_preference_record(XXPO) == expected
    assert parse_preference_record(TRL_TEXT) == expected
    assert parse_preference_record(TRL_CHAT) == expected
    system = parse_preference_record({**TRL_TEXT, "system": "Be brief."})
    assert system[0][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("record, field, problem", [
    ({**XXPO, "rejected": [{"role": "human", "content": "Add 2 and 2."}, {"role": "bot", "content": "4"}]},
     "rejected", "different prompt from chosen"),
    ({**TRL_TEXT, "chosen": "  "}, "chosen", "empty assistant content"),
    ({**XXPO, "rejected": [XXPO["rejected"][0], {"role": "bot", "content": ""}]}, "rejected[1].content",
     "empty assistant content"),
    ({**TRL_TEXT, "rejected": "3"}, "rejected", "identical to chosen"),
    ({"prompt": "x", "chosen": "y"}, "rejected", "missing"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
    ({**XXPO, "chosen": [{"role": "robot", "content": "x"}]}, "chosen[0].role", "unknown role"),
])
def test_bad_records_named(record, field, problem):
    with pytest.raises(BadRecord) as e:
        parse_preference_record(record)
    assert e.value.field == field and problem in e.value.problem


def test_bad_records_path_line_and_skip(tmp_path, smollm2_tokenizer):
    task = tmp_path / "task_a"
    task.mkdir()
    _write(task / "x.jsonl", [TRL_TEXT, {**TRL_TEXT, "rejected": "3"}, XXPO])
    with pytest.raises(DataError, match=r"x\.jsonl:2: rejected: identical to chosen"):
        build_preference_data(smollm2_tokenizer, data_paths=[str(task)], valid_ratio=0, max_length=64,
                              max_prompt_length=32)
    data = build_preference_data(smollm2_tokenizer, data_paths=[str(task)], valid_ratio=0, max_length=64,
                                 max_prompt_length=32, on_bad_record="skip")
    assert len(data.train_samples) == 2 and data.counts["task_a"]["bad"] == 1


def test_loss_on_final_answer_and_eos_as_sft(tmp_path, smollm2_tokenizer):
    """The chosen sequence is the SFT rendering of prompt + chosen; loss only on the last answer and its EOS."""
    record = {"chosen": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"},
                         {"role": "human", "content": "sum 1 2"}, {"role": "bot", "content": "3"}],
              "rejected": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "hello"},
                           {"role": "human", "content": "sum 1 2"}, {"role": "bot", "content": "12"}]}
    pref_dir, sft_dir = tmp_path / "p", tmp_path / "s"
    pref_dir.mkdir(), sft_dir.mkdir()
    _write(pref_dir / "t.jsonl", [record])
    _write(sft_dir / "t.jsonl", [{"chat_rounds": record["chosen"]}])
    pair = build_preference_data(smollm2_tokenizer, data_paths=[str(pref_dir)], valid_ratio=0, max_length=256,
                                 max_prompt_length=128).train_samples[0]
    sft = build_mft_data(smollm2_tokenizer, data_paths=[str(sft_dir)], valid_ratio=0, seq_len=256,
                         cache_dir="", num_workers=1).train_samples[0]
    chosen_ids, chosen_mask = pair.input_ids[:pair.chosen_len], pair.loss_mask[:pair.chosen_len]
    np.testing.assert_array_equal(chosen_ids, sft.input_ids)
    # SFT has loss on both answers; the pair only on the last one (and its EOS)
    assert chosen_mask.sum() < sft.loss_mask.sum()
    assert np.all(sft.loss_mask[chosen_mask])
    answer = smollm2_tokenizer.decode(chosen_ids[chosen_mask])
    assert answer.startswith("3") and answer.endswith(smollm2_tokenizer.eos_token)


def test_truncation_cuts_prompt_start_then_answer_end():
    p, c, r, cut = truncate_pair(list(range(10)), [20, 21, 22], [30], max_length=8, max_prompt_length=4)
    assert cut and p == [6, 7, 8, 9] and c == [20, 21, 22] and r == [30]  # prompt keeps its end
    p, c, r, cut = truncate_pair(list(range(10)), [20, 21, 22, 23, 24, 25], [30], max_length=8, max_prompt_length=4)
    assert p == [6, 7, 8, 9] and c == [20, 21, 22, 23] and r == [30]  # answers keep their start
    assert truncate_pair([1], [2], [3], 8, 4) == ([1], [2], [3], False)


def test_pairs_packed_together_with_sequence_boundaries(tmp_path, smollm2_tokenizer):
    task_a, task_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(task_a, [{"prompt": f"q{i} " * (i + 1), "chosen": "yes " * (i + 1), "rejected": "no"} for i in range(6)])
    _write(task_b, [{"prompt": f"w{i}", "chosen": "ok", "rejected": "bad " * (i + 2)} for i in range(5)])
    data = build_preference_data(smollm2_tokenizer, data_paths=[str(task_a), str(task_b)], valid_ratio=0,
                                 max_length=48, max_prompt_length=24)
    loader = build_train_loader(data, micro_batch_size=2, gradient_accumulation_steps=1, rank=0, world_size=1)
    seen = 0
    for batch in loader:
        sample_ids, labels = batch["sample_ids"], batch["labels"]
        pairs = batch["pair_task_ids"].shape[0]
        seen += pairs
        for p, index in enumerate(batch["pair_index"].tolist()):
            pair = data.train_samples[index]
            chosen = batch["input_ids"][sample_ids == 2 * p]
            rejected = batch["input_ids"][sample_ids == 2 * p + 1]
            np.testing.assert_array_equal(chosen.numpy(), pair.input_ids[:pair.chosen_len])
            np.testing.assert_array_equal(rejected.numpy(), pair.input_ids[pair.chosen_len:])
            for s in (2 * p, 2 * p + 1):  # positions restart per sequence; the last token predicts nothing
                assert batch["position_ids"][sample_ids == s].tolist() == list(range(int((sample_ids == s).sum())))
                assert int(labels[sample_ids == s][-1]) == -100
            assert int(batch["pair_task_ids"][p]) == pair.task_id
    assert seen == len(data.train_samples) == 11


@pytest.mark.parametrize("kwargs, key", [({"max_prompt_length": 64}, "max_prompt_length"),
                                          ({"seq_len": 40}, "data.seq_len"), ({"max_length": 0}, "max_length")])
def test_bad_options_name_the_key(tmp_path, smollm2_tokenizer, kwargs, key):
    _write(tmp_path / "t.jsonl", [TRL_TEXT])
    options = {"max_length": 32, "max_prompt_length": 16, **kwargs}
    with pytest.raises(DataError, match=key):
        build_preference_data(smollm2_tokenizer, data_paths=[str(tmp_path / "t.jsonl")], **options)


def test_fingerprint_follows_the_pairs(tmp_path, smollm2_tokenizer):
    """What precomputed reference log-probs are keyed to: the same data gives the same key, one changed answer
    another."""
    path = _write(tmp_path / "t.jsonl", [TRL_TEXT, {**TRL_TEXT, "chosen": "three"}])
    options = dict(data_paths=[str(path)], valid_ratio=0, max_length=32, max_prompt_length=16)
    first = build_preference_data(smollm2_tokenizer, **options).fingerprint()
    assert build_preference_data(smollm2_tokenizer, **options).fingerprint() == first
    _write(path, [TRL_TEXT, {**TRL_TEXT, "chosen": "3!"}])
    assert build_preference_data(smollm2_tokenizer, **options).fingerprint() != first
