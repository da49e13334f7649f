"""Tests for mft_components/data/ (records, tasks, tokenize, build, stats, report): record shapes, bad-record reports,
split, truncation, cache, workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import cli
from mft_components.data import tokenize as tokenize_mod
from mft_components.data.build import build_mft_data
from mft_components.data.records import DataError
from mft_components.data.sampling import build_train_loader, build_valid_loader
from mft_components.data.stats import format_stats, task_stats, total_stats
from mft_components.data.tasks import discover_tasks
from mft_components.data.templates import ChatFormat, encode_segments
from tests.conftest import REPO_ROOT, drop_dac_override, file_tree


def write_jsonl(path: Path, records, raw_lines=()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) if not isinstance(r, str) else r for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def conv(i: int, turns: int = 1) -> dict:
    rounds = []
    for t in range(turns):
        rounds += [{"role": "human", "content": f"Question {i}.{t}: add {i} and {t}."},
                   {"role": "bot", "content": f"def f():\n    return {i} + {t}"}]
    return {"id": i, "chat_rounds": rounds}


def build(tok, paths, tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("valid_ratio", 0.0)
    return build_mft_data(tok, data_paths=[str(p) for p in paths], **kw)


def as_lists(samples):
    return [(s.input_ids.tolist(), s.loss_mask.tolist(), s.task_id) for s in samples]


def test_record_shapes_render_like_templates(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    records = [
        {"chat_rounds": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "gpt", "content": "Hello"}, {"role": "Human", "content": "Bye"},
                         {"role": "assistant", "content": "Bye!"}], "data_name": "ignored"},
        {"prompt": "P1", "answer": "A1"},
        {"prompt": "P2", "response": "R2", "system": "S2"},
        {"instruction": "Sum", "input": "1 2", "output": "3"},
        {"instruction": "Say x", "input": "", "output": "x"},
        {"question": "Q?", "answer": "yes"},
        {"input": "in", "output": "out"},
        {"text": "def raw():\n    pass"},
    ]
    path = write_jsonl(tmp_path / "shapes" / "a.jsonl", records)
    d = build(tok, [path.parent], tmp_path)
    fmt = ChatFormat()
    expected_msgs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "Bye!"}],
        [{"role": "user", "content": "P1"}, {"role": "assistant", "content": "A1"}],
        [{"role": "system", "content": "S2"}, {"role": "user", "content": "P2"}, {"role": "assistant", "content": "R2"}],
        [{"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}],
        [{"role": "user", "content": "Say x"}, {"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}],
        [{"role": "user", "content": "in"}, {"role": "assistant", "content": "out"}],
    ]
    assert d.task_names == ["shapes"]
    for sample, msgs in zip(d.train_samples, expected_msgs):
        ids, mask = fmt.render(msgs, tok)
        assert sample.input_ids.tolist() == ids and sample.loss_mask.tolist() == mask
        assert sample.input_ids.dtype == np.int32 and sample.loss_mask.dtype == np.bool_
    text = d.train_samples[-1]
    assert tok.decode(text.input_ids) == "def raw():\n    pass\n<|im_end|>" and text.loss_mask.all()
    st = task_stats(d)["shapes"]
    assert (st["records"], st["kept"], st["bad"], st["turns"]) == (8, 8, 0, 8)
    assert st["loss_tokens"] == sum(int(s.loss_mask.sum()) for s in d.train_samples)


def test_openai_messages_and_sharegpt_conversations_train_as_chat_rounds(smollm2_tokenizer, tmp_path):
    """The same conversations in the three list shapes give identical samples; a top-level system (LLaMA-Factory's
    ShareGPT) is the system turn of messages/conversations records."""
    turns = [("system", "Be brief."), ("user", "Sum 1 2"), ("assistant", "3"), ("user", "Times 2?"), ("assistant", "6")]
    sharegpt_roles = {"system": "system", "user": "human", "assistant": "gpt"}
    reference = [{"chat_rounds": [{"role": r, "content": c} for r, c in turns]},
                 {"chat_rounds": [{"role": r, "content": c} for r, c in turns[1:3]]}]
    records = [{"messages": [{"role": r, "content": c} for r, c in turns]},
               {"conversations": [{"from": sharegpt_roles[r], "value": c} for r, c in turns]},
               {"conversations": [{"from": sharegpt_roles[r], "value": c} for r, c in turns[1:]], "system": "Be brief."},
               {"messages": [{"role": r, "content": c} for r, c in turns[1:3]], "system": ""}]
    got = as_lists(build(smollm2_tokenizer, [write_jsonl(tmp_path / "new" / "a.jsonl", records)], tmp_path).train_samples)
    want = as_lists(build(smollm2_tokenizer, [write_jsonl(tmp_path / "new" / "a.jsonl", reference)], tmp_path,
                          cache_dir=str(tmp_path / "cache2")).train_samples)
    assert got == [want[0], want[0], want[0], want[1]]


def mftcoder_single_turn(tok, system: str, prompt: str, answer: str) -> tuple[list[int], list[bool]]:
    """MFTCoder's tokenisation of a single-turn record (``UniformEncoder._tokenize_fields``, sft mode, default
    markers): every content gets a trailing newline, the prompt side is encoded in one piece, then the answer
    and EOS (the only tokens with loss); no newline after EOS."""
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids = enc((f"<s>system\n{system}\n" if system else "") + f"<s>human\n{prompt}\n<s>bot\n")
    answer_ids = enc(answer + "\n") + [tok.eos_token_id]
    return prompt_ids + answer_ids, [False] * len(prompt_ids) + [True] * len(answer_ids)


def test_mftcoder_single_turn_shapes_render_byte_exact(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    records = [
        ({"instruction": "Reverse xs.", "response": "xs[::-1]"}, "", "Reverse xs.", "xs[::-1]"),
        ({"question": "What is 2+2?", "response": "4", "system": "Be exact."}, "Be exact.", "What is 2+2?", "4"),
        ({"query": "Sort xs.", "answer": "sorted(xs)", "system": ""}, "", "Sort xs.", "sorted(xs)"),
        ({"query": "q", "answer": "def f():\n    return 1", "system": "S"}, "S", "q", "def f():\n    return 1"),
    ]
    path = write_jsonl(tmp_path / "mftcoder" / "a.jsonl", [r for r, *_ in records])
    d = build(tok, [path.parent], tmp_path)
    assert len(d.train_samples) == len(records)
    for sample, (_, system, prompt, answer) in zip(d.train_samples, records):
        ids, mask = sample.input_ids.tolist(), sample.loss_mask.tolist()
        text = (f"<s>system\n{system}\n" if system else "") + f"<s>human\n{prompt}\n<s>bot\n{answer}\n<|im_end|>\n"
        assert tok.decode(ids) == text
        # MFTCoder's ids and mask, plus mft's newline after EOS, which carries no loss (nothing reads it).
        ref_ids, ref_mask = mftcoder_single_turn(tok, system, prompt, answer)
        assert ids[:-1] == ref_ids and mask[:-1] == ref_mask
        assert ids[-1:] == tok("\n", add_special_tokens=False)["input_ids"] and not mask[-1]


BAD_CASES = [  # (line text, field, words in the problem)
    ('{"chat_rounds": [', "json", "invalid JSON"),
    ('{"prompt": "x"}', "record", "no known shape: 'prompt' has no answer/response to learn"),
    ('{"instruction": "x", "system": "s"}', "record", "'instruction' has no output/response to learn"),
    ('{"query": "x", "response": "y"}', "record", "'query' has no answer to learn"),
    ('{"id": 3}', "record", "no known shape"),
    ('{"chat_rounds": []}', "chat_rounds", "is empty"),
    ('{"chat_rounds": [{"role": "narrator", "content": "x"}]}', "chat_rounds[0].role", "unknown role 'narrator'"),
    ('{"chat_rounds": [{"role": "human", "content": "q"}, {"role": "system", "content": "s"}, '
     '{"role": "bot", "content": "a"}]}', "chat_rounds[1].role", "only allowed as the first turn"),
    ('{"chat_rounds": [{"role": "human", "content": "q"}, {"role": "human", "content": "q2"}, '
     '{"role": "bot", "content": "a"}]}', "chat_rounds[1].role", "must alternate"),
    ('{"chat_rounds": [{"role": "bot", "content": "a"}]}', "chat_rounds[0].role", "must alternate"),
    ('{"chat_rounds": [{"role": "human", "content": 5}, {"role": "bot", "content": "a"}]}',
     "chat_rounds[0].content", "expected a string, got int"),
    ('{"chat_rounds": [{"role": "human", "content": "q"}]}', "chat_rounds", "no assistant turn"),
    ('{"prompt": ["x"], "answer": "a"}', "prompt", "expected a string, got list"),
    ('[1, 2]', "record", "expected a JSON object, got list"),
    ('{"chat_rounds": "hello"}', "chat_rounds", "expected a list"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}', "messages[1].role",
     "unknown role 'tool'"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}', "conversations[1].value",
     "empty assistant content"),
    ('{"conversations": [{"from": "gpt", "value": "a"}]}', "conversations[0].from", "must alternate"),
    ('{"conversations": [{"role": "user", "content": "q"}]}', "conversations[0].from", "missing"),
]


def test_every_bad_record_is_reported_with_path_line_field(smollm2_tokenizer, tmp_path):
    path = tmp_path / "task" / "bad.jsonl"
    path.parent.mkdir()
    lines = [json.dumps(conv(0))] + [line for line, _, _ in BAD_CASES]
    body = "\n".join(lines).encode() + b'\n{"text": "caf\xe9"}\n'  # invalid UTF-8 on the last line
    path.write_bytes(body)
    with pytest.raises(DataError) as err:
        build(tok := smollm2_tokenizer, [path.parent], tmp_path)
    msg = str(err.value)
    for k, (_, field, words) in enumerate(BAD_CASES):
        line = next(x for x in msg.splitlines() if x.startswith(f"{path}:{k + 2}:"))
        assert f"{path}:{k + 2}: {field}: " in line and words in line, line
    assert f"{path}:{len(BAD_CASES) + 2}: line: invalid UTF-8" in msg
    assert f"{len(BAD_CASES) + 1} bad record(s)" in msg and f"{path}:1:" not in msg
    # skip: the good record is kept, the bad ones are counted for the task.
    d = build(tok, [path.parent], tmp_path, on_bad_record="skip")
    st = task_stats(d)["task"]
    assert (st["records"], st["bad"], st["kept"]) == (len(BAD_CASES) + 2, len(BAD_CASES) + 1, 1)
    assert len(d.skipped) == len(BAD_CASES) + 1


def test_at_most_20_problems_listed(smollm2_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [conv(0)] + ["{bad"] * 25)
    with pytest.raises(DataError) as err:
        build(smollm2_tokenizer, [path], tmp_path)
    msg = str(err.value)
    assert msg.count(f"{path}:") == 20 and "... and 5 more" in msg and "25 bad record(s)" in msg


def test_bom_crlf_blank_lines(smollm2_tokenizer, tmp_path):
    records = [conv(i) for i in range(3)]
    clean = write_jsonl(tmp_path / "clean" / "x.jsonl", records)
    messy = tmp_path / "messy" / "x.jsonl"
    messy.parent.mkdir()
    messy.write_bytes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(json.dumps(r).encode() for r in records) + b"\r\n  \r\n")
    a = build(smollm2_tokenizer, [clean.parent], tmp_path)
    b = build(smollm2_tokenizer, [messy.parent], tmp_path)
    assert as_lists(a.train_samples) == as_lists(b.train_samples)
    assert task_stats(b)["messy"]["records"] == 3 and task_stats(b)["messy"]["bad"] == 0


def test_task_discovery(tmp_path):
    write_jsonl(tmp_path / "repair" / "a.jsonl", [conv(0)])
    write_jsonl(tmp_path / "repair" / "sub" / "b.jsonl", [conv(1)])
    (tmp_path / "repair" / "notes.txt").write_text("ignored")
    write_jsonl(tmp_path / "extra" / "tests.jsonl", [conv(2)])
    tasks = discover_tasks([tmp_path / "repair", tmp_path / "extra" / "tests.jsonl"])
    assert list(tasks) == ["repair", "tests"]
    assert [p.name for p in tasks["repair"]] == ["a.jsonl", "b.jsonl"]
    write_jsonl(tmp_path / "other" / "repair" / "c.jsonl", [conv(3)])
    with pytest.raises(DataError, match="'repair'") as err:
        discover_tasks([tmp_path / "repair", tmp_path / "other" / "repair"])
    assert str(tmp_path / "repair") in str(err.value) and str(tmp_path / "other" / "repair") in str(err.value)
    with pytest.raises(DataError, match=r"data.data_paths\[0\]: .*no such file"):
        discover_tasks([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.jsonl"):
        discover_tasks([tmp_path / "empty"])


def test_truncation_drop_and_truncate(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    long_answer = {"chat_rounds": [{"role": "human", "content": "q"}, {"role": "bot", "content": "word " * 200}]}
    long_prompt = {"chat_rounds": [{"role": "human", "content": "word " * 200}, {"role": "bot", "content": "a"}]}
    path = write_jsonl(tmp_path / "t" / "x.jsonl", [conv(0), long_answer, long_prompt, conv(1)])
    d = build(tok, [path.parent], tmp_path, seq_len=64)
    st = task_stats(d)["t"]
    assert (st["kept"], st["dropped"], st["truncated"]) == (2, 2, 0)
    d = build(tok, [path.parent], tmp_path, seq_len=64, truncation="truncate")
    st = task_stats(d)["t"]
    # The long prompt leaves no loss token within 64 tokens: dropped even when truncating.
    assert (st["kept"], st["dropped"], st["truncated"]) == (3, 1, 1)
    cut = d.train_samples[1]
    full_ids, full_mask = ChatFormat().render(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}], tok)
    assert cut.input_ids.tolist() == full_ids[:64] and cut.loss_mask.tolist() == full_mask[:64]
    assert all(len(s.input_ids) <= 64 for s in d.train_samples)


def test_split_per_task_deterministic(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    a = write_jsonl(tmp_path / "a.jsonl", [conv(i) for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [conv(100 + i) for i in range(3)])
    c = write_jsonl(tmp_path / "c.jsonl", [conv(200)])
    runs = [build(tok, [a, b, c], tmp_path, valid_ratio=0.1, seed=7, rank=r, world_size=w) for r, w in
            ((0, 1), (1, 2), (3, 4))]
    for d in runs[1:]:
        assert as_lists(d.train_samples) == as_lists(runs[0].train_samples)
        assert as_lists(d.valid_samples) == as_lists(runs[0].valid_samples)
    d = runs[0]
    assert [(task_stats(d)[t]["train"], task_stats(d)[t]["valid"]) for t in "abc"] == [(36, 4), (2, 1), (1, 0)]
    # Train + valid is a partition of the kept samples.
    every = sorted(map(str, as_lists(d.train_samples) + as_lists(d.valid_samples)))
    assert every == sorted(map(str, as_lists(build(tok, [a, b, c], tmp_path).train_samples)))
    other = build(tok, [a, b, c], tmp_path, valid_ratio=0.1, seed=8)
    assert as_lists(other.valid_samples) != as_lists(d.valid_samples)
    sized = build(tok, [a, b, c], tmp_path, valid_size=2)
    assert [task_stats(sized)[t]["valid"] for t in "abc"] == [2, 2, 0]  # c: one sample, nothing held out
    with pytest.raises(DataError, match=r"data.valid_size: 5 samples per task .*\(b: 3 samples, 2 held out, 1 left"):
        build(tok, [a, b, c], tmp_path, valid_size=5)


def test_valid_data_paths(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    a = write_jsonl(tmp_path / "train" / "a.jsonl", [conv(i) for i in range(5)])
    va = write_jsonl(tmp_path / "valid" / "a.jsonl", [conv(50), conv(51)])
    d = build(tok, [a], tmp_path, valid_data_paths=[str(va)], valid_ratio=0.5)
    assert (task_stats(d)["a"]["train"], task_stats(d)["a"]["valid"]) == (5, 2)
    zz = write_jsonl(tmp_path / "valid" / "zz.jsonl", [conv(52)])
    with pytest.raises(DataError, match="valid_data_paths.*'zz'"):
        build(tok, [a], tmp_path, valid_data_paths=[str(zz)])


def is_memory_mapped(a) -> bool:
    import mmap

    while a is not None:
        if isinstance(a, (mmap.mmap, np.memmap)):
            return True
        a = getattr(a, "base", None)
    return False


def test_cache_warm_start_is_identical_and_memory_mapped(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    path = write_jsonl(tmp_path / "t" / "x.jsonl", [conv(i, turns=2) for i in range(20)] + ["{bad"])
    uncached = build(tok, [path.parent], tmp_path, cache_dir="", on_bad_record="skip")
    cold = build(tok, [path.parent], tmp_path, on_bad_record="skip")
    entries = list((tmp_path / "cache").glob("*/*/info.json"))
    assert len(entries) == 1
    warm = build(tok, [path.parent], tmp_path, on_bad_record="skip")
    assert is_memory_mapped(warm.train_samples[0].input_ids) and is_memory_mapped(warm.train_samples[-1].loss_mask)
    assert not is_memory_mapped(uncached.train_samples[0].input_ids)
    assert as_lists(uncached.train_samples) == as_lists(cold.train_samples) == as_lists(warm.train_samples)
    assert task_stats(warm) == task_stats(cold)
    # Bad records are remembered by the cache: error mode still fails on a warm start.
    with pytest.raises(DataError, match=":21: json:"):
        build(tok, [path.parent], tmp_path)
    # Changing the file, the seq_len or the template makes a new entry.
    write_jsonl(path, [conv(i) for i in range(5)])
    assert task_stats(build(tok, [path.parent], tmp_path))["t"]["kept"] == 5
    build(tok, [path.parent], tmp_path, seq_len=512)
    build(tok, [path.parent], tmp_path, template="hf")
    assert len(list((tmp_path / "cache").glob("*/*/info.json"))) == 4


def test_worker_processes_match_in_process(smollm2_tokenizer, tmp_path, monkeypatch):
    tok = smollm2_tokenizer
    a = write_jsonl(tmp_path / "a.jsonl", [conv(i, turns=1 + i % 3) for i in range(150)] + ["{bad"])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(60)])
    ref = build(tok, [a, b], tmp_path, cache_dir="", num_workers=1, on_bad_record="skip")
    # Tiny chunks and no in-process shortcut: the work is spread over 2 forked workers in many byte ranges.
    monkeypatch.setattr(tokenize_mod, "_CHUNK_BYTES", 700)
    monkeypatch.setattr(tokenize_mod, "_IN_PROCESS_BYTES", 0)
    par = build(tok, [a, b], tmp_path, cache_dir="", num_workers=2, on_bad_record="skip")
    assert as_lists(par.train_samples) == as_lists(ref.train_samples)
    assert par.skipped == ref.skipped == [f"{a}:151: json: invalid JSON: Expecting property name enclosed in double quotes at column 2"]


def test_line_ranges_cover_file():
    data = b"a\nbb\n\nccc\nd"
    for chunk in (1, 2, 3, 100):
        ranges = tokenize_mod._line_ranges(data, chunk)
        assert b"".join(data[s:e] for s, e, _ in ranges) == data
        for s, _, line in ranges:
            assert line == data[:s].count(b"\n") + 1


def test_option_errors_name_the_key(smollm2_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [conv(0)])
    for kw, key in [({"packing": "stack"}, "data.packing"), ({"truncation": "cut"}, "data.truncation"),
                    ({"on_bad_record": "ignore"}, "data.on_bad_record"), ({"seq_len": 0}, "data.seq_len"),
                    ({"task_sampling": "temperature"}, "data.temperature"), ({"template": "chatml"}, "data.template"),
                    ({"valid_ratio": 1.5}, "data.valid_ratio")]:
        with pytest.raises(DataError, match=key.replace(".", r"\.")):
            build(smollm2_tokenizer, [path], tmp_path, **kw)


def test_task_without_samples_is_an_error(smollm2_tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [conv(0)])
    b = write_jsonl(tmp_path / "b.jsonl", ["{bad"])
    with pytest.raises(DataError, match="without training samples: b: 1 records, 1 bad"):
        build(smollm2_tokenizer, [a, b], tmp_path, on_bad_record="skip")


def test_stats_and_loaders(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    a = write_jsonl(tmp_path / "alpha.jsonl", [conv(i) for i in range(30)])
    b = write_jsonl(tmp_path / "beta.jsonl", [conv(100 + i, turns=2) for i in range(10)])
    d = build(tok, [a, b], tmp_path, seq_len=128, valid_ratio=0.1)
    table = format_stats(task_stats(d))
    assert "alpha" in table and "beta" in table and "total" in table and "pack_eff" in table
    total = total_stats(task_stats(d))
    assert list(task_stats(d)) == ["alpha", "beta"]
    assert total["kept"] == 40 and total["train"] + total["valid"] == 40 and total["rows"] >= 1
    assert 0 < total["packing_efficiency"] <= 1
    assert d.pad_id == tok.pad_token_id and d.task_sample_counts == {"alpha": 27, "beta": 9}
    loader = build_train_loader(d, micro_batch_size=2, gradient_accumulation_steps=1, rank=0, world_size=1)
    loader.sampler.set_epoch(0)
    seen = 0
    for batch in loader:
        assert batch["input_ids"].shape[1] == 128
        seen += int((batch["labels"] != -100).sum())
    # Every loss token except a sample's first token (never a label after the shift) is trained once per epoch.
    assert seen == sum(int(s.loss_mask[1:].sum()) for s in d.train_samples)
    vseen = sum(int((bt["labels"] != -100).sum()) for bt in build_valid_loader(d, micro_batch_size=2))
    assert vseen == sum(int(s.loss_mask[1:].sum()) for s in d.valid_samples)


DISTRIBUTED_SCRIPT = '''
import sys, json
import torch.distributed as dist
from transformers import AutoTokenizer
from mft_components.data import tokenize as tokenize_mod
from mft_components.data import DataError, build_mft_data

tok_dir, good, bad, cache, out = sys.argv[1:6]
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank != 0:
    def refuse(*a, **k):
        raise AssertionError("only local rank 0 tokenises; the others memory-map its cache")
    tokenize_mod._process_range = refuse
tok = AutoTokenizer.from_pretrained(tok_dir)
d = build_mft_data(tok, data_paths=[good], cache_dir=cache, valid_ratio=0.2, seed=3, rank=rank, world_size=2)
try:
    build_mft_data(tok, data_paths=[bad], cache_dir=cache, rank=rank, world_size=2)
    err = None
except DataError as e:
    err = str(e)
rows = [[s.input_ids.tolist(), s.loss_mask.tolist()] for s in d.train_samples + d.valid_samples]
json.dump({"rows": rows, "error": err}, open(f"{out}.{rank}", "w"))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_distributed_rank0_builds_others_load(smollm2_dir, tmp_path):
    from tests.conftest import run_torchrun

    good = write_jsonl(tmp_path / "good.jsonl", [conv(i) for i in range(20)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [conv(0), "{oops"])
    script = tmp_path / "build.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    out = tmp_path / "out"
    run_torchrun(script, smollm2_dir, good, bad, tmp_path / "cache", out, nproc=2)
    r0, r1 = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    assert r0["rows"] == r1["rows"] and len(r0["rows"]) == 20
    # A bad record fails on every rank (no rank left waiting on a barrier), with the same message.
    assert r0["error"] == r1["error"] and f"{bad}:2: json:" in r0["error"]


def test_mft_data_command_prints_stats_and_marked_samples(smollm2_dir, tmp_path, capsys):
    """`mft data` (mft_components/data/report.py) on a config: the table, and samples with [[loss]] marked."""
    import argparse

    from mft_components.data import report as data_report

    a = write_jsonl(tmp_path / "alpha" / "x.jsonl", [conv(i) for i in range(4)] + ["{bad"])
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "tokenizer:\n  _component_: mft_components.models.load_tokenizer\n"
        f"  path: {smollm2_dir}\n"
        "data:\n  _component_: mft_components.data.build_mft_data\n"
        f"  data_paths: [{a.parent}]\n  seq_len: 256\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    parser = argparse.ArgumentParser()
    data_report.add_arguments(parser)
    assert data_report.run(parser.parse_args(["--config", str(config)])) == 1  # the bad record stops it
    assert f"{a}:5: json: invalid JSON" in capsys.readouterr().err
    args = parser.parse_args(["--config", str(config), "--show", "1", "--color", "never", "data.on_bad_record=skip"])
    assert data_report.run(args) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "pack_eff" in out and "1 bad record(s) skipped" in out
    assert "<s>human\nQuestion 0.0: add 0 and 0.\n<s>bot\n[[def f():\n    return 0 + 0\n<|im_end|>]]\n" in out


# --------------------------------------------------------------------------------- through `mft data` (cli.py)


def data_config(tmp_path: Path, tokenizer_dir, data_paths, name: str = "data", **extra) -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "tokenizer": {"_component_": "mft_components.models.load_tokenizer", "path": str(tokenizer_dir)},
        "data": {"_component_": "mft_components.data.build_mft_data", "data_paths": [str(p) for p in data_paths],
                 "seq_len": 256, "valid_ratio": 0.0, "num_workers": 0, "cache_dir": str(tmp_path / "cache"), **extra},
    }))
    return config


def test_malformed_lines_are_bad_records(smollm2_dir, tmp_path, capsys):
    """Lines that used to abort the build (RecursionError, a tokenizer TypeError) or were blamed on the wrong
    field are each one `path:line: field: problem`; with on_bad_record: skip the rest of the file trains."""
    ok = conv(0)
    lines = [
        json.dumps(ok),
        "[" * 10_000 + "]" * 10_000,                                                     # 2: deeper than json reads
        json.dumps({"prompt": "caf\ud800", "answer": "x"}),                              # 3: lone surrogate
        '{"id": ' + "7" * 5000 + ', "prompt": "p", "answer": "a"}',                      # 4: fine, id is ignored
        '{"prompt": "p", "answer": ' + "7" * 5000 + '}',                                 # 5: a number, not text
        '{"prompt": "nul\x00", "answer": "a"}',                                          # 6: raw control character
        json.dumps({"chat_rounds": [{"role": "user", "content": "q"}, {"role": "bot", "content": " \n"}]}),  # 7
        json.dumps({"prompt": "", "answer": "an answer to nothing"}),                    # 8: fine, empty user turn
    ]
    task = tmp_path / "task" / "t.jsonl"
    task.parent.mkdir()
    task.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    config = data_config(tmp_path, smollm2_dir, [task.parent])
    before = file_tree(tmp_path, exclude=(tmp_path / "cache",))

    assert cli.main(["data", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "5 bad record(s) in task" in err
    assert f"{task}:2: json: nested too deeply (Python's JSON decoder stops at about" in err
    assert f"{task}:3: prompt: lone surrogate '\\ud800' at character 3: not valid Unicode text" in err
    assert f"{task}:5: answer: expected a string, got int" in err
    assert f"{task}:6: json: invalid JSON: Invalid control character '\\x00' at column 16 (control characters" in err
    assert f"{task}:7: chat_rounds[1].content: empty assistant content (nothing to learn)" in err
    assert f"{task}:4:" not in err and f"{task}:8:" not in err and "at at" not in err

    assert cli.main(["data", "--config", str(config), "data.on_bad_record=skip"]) == 0
    out = capsys.readouterr().out
    assert "5 bad record(s) skipped" in out
    assert re.search(r"^task\s+8\s+5\s+3\s", out, re.M), out  # records, bad, kept
    assert file_tree(tmp_path, exclude=(tmp_path / "cache",)) == before


def test_symlinked_subdirectories_are_followed(smollm2_dir, tmp_path, capsys):
    """A task assembled from linked folders trains all of them; a link back up (a cycle) and a second path to the
    same file are read once; a link to nothing is named."""
    shared = write_jsonl(tmp_path / "elsewhere" / "shared.jsonl", [conv(i) for i in range(3)])
    write_jsonl(tmp_path / "task" / "own.jsonl", [conv(i) for i in range(2)])
    (tmp_path / "task" / "linked").symlink_to(shared.parent, target_is_directory=True)
    (tmp_path / "task" / "linked_again").symlink_to(shared.parent, target_is_directory=True)
    (tmp_path / "task" / "loop").symlink_to(tmp_path / "task", target_is_directory=True)
    (tmp_path / "task" / "same.jsonl").symlink_to(shared)
    config = data_config(tmp_path, smollm2_dir, [tmp_path / "task"])
    assert cli.main(["data", "--config", str(config)]) == 0
    assert re.search(r"^task\s+5\s+0\s+5\s", capsys.readouterr().out, re.M)  # 2 own + 3 shared, each once
    assert discover_tasks([tmp_path / "task"])["task"] == [tmp_path / "task" / "own.jsonl",
                                                           tmp_path / "task" / "same.jsonl"]

    (tmp_path / "task" / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    assert cli.main(["data", "--config", str(config)]) == 1
    assert (f"data.data_paths[0]: {tmp_path / 'task' / 'gone.jsonl'}: symbolic link to {tmp_path / 'deleted.jsonl'}, "
            "which does not exist") in capsys.readouterr().err


def test_tokenizer_without_eos_is_one_error(smollm2_dir, tmp_path, capsys):
    """Every record needs the EOS token: one message about the tokenizer, not one bad record per line."""
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(smollm2_dir / "tokenizer.json", tok)
    settings = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": None}))
    task = write_jsonl(tmp_path / "task" / "t.jsonl", [conv(i) for i in range(30)])
    assert cli.main(["data", "--config", str(data_config(tmp_path, tok, [task.parent]))]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"mft data: tokenizer {tok}: has no eos_token, which ends every assistant turn; use a "
                           "tokenizer that defines one (eos_token in tokenizer_config.json)")
    assert not (tmp_path / "cache").exists()  # nothing was tokenised


def test_unreadable_files_and_directories_are_named(smollm2_dir, tmp_path):
    """A file and a task directory this process may not read (mode 000; as root, with the capabilities that
    bypass modes dropped) are named with the reason, instead of a PermissionError traceback or "contains no
    *.jsonl files"."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    can_read = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"], preexec_fn=drop_dac_override,
                              capture_output=True).returncode == 0
    if can_read:
        pytest.skip("this process reads mode-000 files (root whose CAP_DAC_OVERRIDE cannot be dropped here)")
    locked_file = write_jsonl(tmp_path / "a" / "train.jsonl", [conv(0)])
    locked_dir = write_jsonl(tmp_path / "b" / "train.jsonl", [conv(1)]).parent
    locked_file.chmod(0)
    locked_dir.chmod(0)
    script = ("import sys, cli\n"
              f"print('rc', cli.main(['data', '--config', {str(data_config(tmp_path, smollm2_dir, [locked_file.parent]))!r}]))\n"
              f"print('rc', cli.main(['data', '--config', {str(data_config(tmp_path, smollm2_dir, [locked_dir], 'b'))!r}]))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", script], preexec_fn=drop_dac_override, capture_output=True,
                              text=True, cwd=REPO_ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        locked_dir.chmod(0o755)
    assert proc.stdout.split() == ["rc", "1", "rc", "1"], proc.stderr[-3000:]
    assert f"mft data: {locked_file}: cannot read the file: Permission denied" in proc.stderr
    assert f"mft data: data.data_paths[0]: {locked_dir}: cannot read the directory: Permission denied" in proc.stderr
    assert "Traceback" not in proc.stderr
