"""Tests for mft_components/assets/: the cached SmolLM2 directory and the dataframebench task dirs."""

from __future__ import annotations

import json
import threading
import time

import pytest

from mft_components.assets import dataframebench, smollm2
from mft_components.assets.cache import build_atomically
from mft_components.assets.dataframebench import dataframebench_conversations


def test_smollm2_dir_is_complete_and_cached(smollm2_dir):
    assert (smollm2_dir / "mft_ready.json").exists()
    assert (smollm2_dir / "model.safetensors").exists()
    config = json.loads((smollm2_dir / "config.json").read_text())
    # The GGUF quantisation marker must be gone, or from_pretrained(dir) would look for a .gguf file.
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    t0 = time.perf_counter()
    assert smollm2.prepare_smollm2(smollm2_dir.parent) == smollm2_dir
    assert time.perf_counter() - t0 < 1.0


def test_smollm2_tokenizer_uses_chatml_eos(smollm2_tokenizer):
    assert smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") == smollm2_tokenizer.eos_token_id


def test_smollm2_greedy_generation_is_sane(smollm2_dir, smollm2_tokenizer):
    """The dequantised weights still answer a factual question: the conversion kept the model intact."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = smollm2_tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
    assert "Paris" in answer, answer


def test_build_atomically_concurrent(tmp_path):
    """Racing builders leave exactly one complete directory and no temporary leftovers."""
    final = tmp_path / "asset"
    calls = []

    def build(tmp):
        calls.append(tmp)
        time.sleep(0.05)
        (tmp / "payload.txt").write_text(f"from {tmp.name}")
        return {"ok": True}

    threads = [threading.Thread(target=build_atomically, args=(final, build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (final / "mft_ready.json").exists() and (final / "payload.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["asset"]
    n = len(calls)
    build_atomically(final, build)  # warm: no rebuild
    assert len(calls) == n


def test_dataframebench_conversations_shapes():
    problem = {
        "task_id": "DFB/T1",
        "prompt": "Describe.\n\n{library_instruction}\n\n```python\n{library_import}\n\ndef task_func(df):\n    pass\n```",
        "ground_truth": {
            "pandas": 'import pandas as pd\n\ndef task_func(df):\n    """Doc."""\n    return df.sum()\n\n'
                      '_reference_impl = task_func\n\ndef task_func(df: pd.DataFrame):\n    return _reference_impl(df)\n',
            "polars": 'import polars as pl\n\ndef task_func(df):\n    """Doc."""\n    return df.sum()\n',
        },
        "test_code": "import unittest\nclass TestCases(unittest.TestCase):\n    pass\n",
    }
    convs = dataframebench_conversations(problem)
    assert set(convs) == set(dataframebench.DATAFRAMEBENCH_TASKS)
    user, bot = convs["polars_solution"]["chat_rounds"]
    assert "Use polars as the data processing library" in user["content"]
    assert "import polars as pl" in user["content"] and "{library" not in user["content"]
    assert bot["content"] == "```python\nimport polars as pl\n\ndef task_func(df):\n    return df.sum()\n```"
    assert convs["unit_tests"]["chat_rounds"][1]["content"].startswith("```python\nimport unittest")
    # The harness wrapper after `_reference_impl = task_func` is not part of the solution.
    assert convs["pandas_to_polars"]["chat_rounds"][0]["content"].endswith("    return df.sum()\n```")


@pytest.mark.slow
def test_prepare_dataframebench(tmp_path_factory):
    root = dataframebench.prepare_dataframebench()
    meta = json.loads((root / "mft_ready.json").read_text())
    assert meta["problems"] == 709
    for task in dataframebench.DATAFRAMEBENCH_TASKS:
        lines = (root / task / "train.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == meta["tasks"][task] > 600
        record = json.loads(lines[0])
        roles = [r["role"] for r in record["chat_rounds"]]
        assert roles == ["human", "bot"] and record["chat_rounds"][1]["content"].startswith("```python\n")
        assert "_reference_impl" not in record["chat_rounds"][1]["content"]
