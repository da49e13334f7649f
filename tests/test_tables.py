"""Tasks from `datasets` files (data/tables.py): Parquet, Arrow save_to_disk, JSON; column mappings; bad rows named
by row; the tokenisation cache; the resume record. The reference is the JSONL path over the same records."""

from __future__ import annotations

import json

import pytest

from mft_components.data import tokenize as tokenize_mod
from mft_components.data.records import DataError
from mft_components.data.stats import task_stats
from mft_components.data.build import build_mft_data
from tests.test_data import as_lists, conv, is_memory_mapped, write_jsonl

datasets = pytest.importorskip("datasets")


def build(tok, paths, tmp_path, **kw):
    """build_mft_data over data_paths entries as a config gives them (strings, or mappings as they are)."""
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("valid_ratio", 0.0)
    return build_mft_data(tok, data_paths=[p if isinstance(p, dict) else str(p) for p in paths], **kw)


def records(n: int = 30) -> list[dict]:
    """Conversations of one to three turns and single-turn prompt/answer records (one shape per table column set)."""
    return [conv(i, turns=1 + i % 3) for i in range(n)]


def as_table(recs: list[dict]):
    """A datasets.Dataset whose rows are the records (chat_rounds: a list of {role, content} structs)."""
    return datasets.Dataset.from_list(recs)


def test_parquet_arrow_and_json_tasks_equal_the_jsonl_task(smollm2_tokenizer, tmp_path):
    recs = records()
    reference = build(smollm2_tokenizer, [write_jsonl(tmp_path / "ref" / "jsonl_task.jsonl", recs)], tmp_path,
                      cache_dir="")
    table = as_table(recs)
    table.to_parquet(str(tmp_path / "one.parquet"))
    (tmp_path / "pq_dir" / "sub").mkdir(parents=True)
    as_table(recs[:12]).to_parquet(str(tmp_path / "pq_dir" / "a.parquet"))
    as_table(recs[12:]).to_parquet(str(tmp_path / "pq_dir" / "sub" / "b.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table, "test": as_table(recs[:2])}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "array.json").write_text(json.dumps(recs))
    sources = [tmp_path / "one.parquet", tmp_path / "pq_dir", tmp_path / "saved", tmp_path / "saved_dict",
               tmp_path / "array.json"]
    for cache in ("", str(tmp_path / "cache"), str(tmp_path / "cache")):  # uncached, cold, warm
        data = build(smollm2_tokenizer, sources, tmp_path, cache_dir=cache)
        assert data.task_names == ["one", "pq_dir", "saved", "saved_dict", "array"]
        for t in range(len(sources)):
            samples = [(ids, mask) for ids, mask, task in as_lists(data.train_samples) if task == t]
            assert samples == [(ids, mask) for ids, mask, _ in as_lists(reference.train_samples)]
    assert is_memory_mapped(data.train_samples[0].input_ids)  # the warm start reads the cache's arrays


def test_column_mapping_split_and_name(smollm2_tokenizer, tmp_path):
    qa = [{"question": f"What is {i}+1?", "solution": str(i + 1), "difficulty": i % 2} for i in range(10)]
    datasets.DatasetDict({"validation": as_table(qa[:3]), "train": as_table(qa)}).save_to_disk(str(tmp_path / "qa"))
    entry = {"path": str(tmp_path / "qa"), "columns": {"prompt": "question", "answer": "solution"}, "name": "math"}
    data = build(smollm2_tokenizer, [entry], tmp_path)
    reference = build(smollm2_tokenizer, [write_jsonl(tmp_path / "math.jsonl", [
        {"prompt": r["question"], "answer": r["solution"]} for r in qa])], tmp_path, cache_dir="")
    assert data.task_names == ["math"] and as_lists(data.train_samples) == as_lists(reference.train_samples)
    small = build(smollm2_tokenizer, [{**entry, "split": "validation"}], tmp_path)
    assert as_lists(small.train_samples) == as_lists(reference.train_samples)[:3]
    # What is wrong with a mapping is named with its key.
    for bad, words in [({**entry, "columns": {"prompt": "questio", "answer": "solution"}},
                        "columns.prompt: no column 'questio'"),
                       ({**entry, "columns": {"promt": "question"}}, "data.data_paths[0].columns: 'promt' is not"),
                       ({**entry, "split": "test"}, "split 'test' not found; it has ['validation', 'train']"),
                       ({**entry, "colums": {}}, "data.data_paths[0]: expected a path, or a mapping with 'path'"),
                       ({"path": str(tmp_path / "nope.parquet")}, "nope.parquet: no such file or directory")]:
        with pytest.raises(DataError) as err:
            build(smollm2_tokenizer, [bad], tmp_path)
        assert words in str(err.value), str(err.value)


def test_bad_rows_are_reported_by_row_and_skipped(smollm2_tokenizer, tmp_path):
    rows = [{"prompt": "p0", "answer": "a0"}, {"prompt": "p1", "answer": ""}, {"prompt": None, "answer": "a2"},
            {"prompt": "p3", "answer": "a3"}]
    as_table(rows).to_parquet(str(tmp_path / "t.parquet"))
    with pytest.raises(DataError) as err:
        build(smollm2_tokenizer, [tmp_path / "t.parquet"], tmp_path)
    assert f"{tmp_path / 't.parquet'}: row 1: answer: empty assistant content" in str(err.value)
    assert f"{tmp_path / 't.parquet'}: row 2: prompt: expected a string, got NoneType" in str(err.value)
    data = build(smollm2_tokenizer, [tmp_path / "t.parquet"], tmp_path, on_bad_record="skip")
    assert task_stats(data)["t"]["bad"] == 2 and len(data.train_samples) == 2


def test_worker_processes_over_rows_match_in_process(smollm2_tokenizer, tmp_path, monkeypatch):
    as_table(records(90)).to_parquet(str(tmp_path / "t.parquet"))
    ref = build(smollm2_tokenizer, [tmp_path / "t.parquet"], tmp_path, cache_dir="", num_workers=1)
    monkeypatch.setattr(tokenize_mod, "_CHUNK_ROWS", 7)
    monkeypatch.setattr(tokenize_mod, "_IN_PROCESS_BYTES", 0)
    par = build(smollm2_tokenizer, [tmp_path / "t.parquet"], tmp_path, cache_dir="", num_workers=2)
    assert as_lists(par.train_samples) == as_lists(ref.train_samples)


def test_a_changed_table_is_tokenised_again_and_changes_the_resume_record(smollm2_tokenizer, tmp_path):
    from mft_components.training.resume_check import run_record

    path = tmp_path / "t.parquet"
    as_table(records(10)).to_parquet(str(path))
    config = {"data": {"_component_": "mft_components.data.build_mft_data", "data_paths": [str(path)]}}
    before = run_record(config)
    assert len(build(smollm2_tokenizer, [path], tmp_path).train_samples) == 10
    as_table(records(6)).to_parquet(str(path))
    assert len(build(smollm2_tokenizer, [path], tmp_path).train_samples) == 6
    after = run_record(config)
    assert before["task_names"] == after["task_names"] == ["t"]
    assert before["tasks"]["t"][0]["sha256"] != after["tasks"]["t"][0]["sha256"]
