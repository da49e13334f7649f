"""bench/gpu_throughput.py's CPU mode end to end: a tiny Llama, the two Hugging Face baselines and mft through its
recipe with configs/llama_lora.yaml's defaults, on the same micro-batches (what the GPU run does at full size)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import REPO_ROOT
from tests.test_recipes import _write_tasks


@pytest.mark.slow
def test_cpu_mode_runs_every_contender(tmp_path, smollm2_dir):
    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO_ROOT / "bench" / "gpu_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results_gpu = REPO_ROOT / "bench" / "RESULTS-GPU.md"
    before = results_gpu.read_text() if results_gpu.exists() else None

    rows = bench.main(["--tiny", "--out", str(tmp_path / "out"), "--tokenizer", str(smollm2_dir),
                       "--data", *_write_tasks(tmp_path / "data", n=16), "--seq-len", "64", "--steps", "4"])

    assert [r["contender"] for r in rows] == ["hf-padded", "hf-packed-liger", "mft"]
    assert not [r["error"] for r in rows if "error" in r]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and len(r["losses"]) >= 2
    mft = rows[-1]
    assert mft["attention"].startswith("auto on cpu: causal SDPA once per sample")  # the shipped config's auto
    assert mft["compile"].startswith("nothing compiled (auto on cpu)")
    assert len(mft["rates"]) == 2  # 4 steps logged every 2 (the config's log interval shortened)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["contender"] for r in saved["rows"]] == ["hf-padded", "hf-packed-liger", "mft"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.count("| tiny-llama |") == 3
    # the CPU mode records nothing: RESULTS-GPU.md holds GPU figures only
    assert (results_gpu.read_text() if results_gpu.exists() else None) == before


def test_a_contender_cut_at_its_time_limit_keeps_what_it_logged(tmp_path):
    """A recipe killed at its limit (GPU runs: a slow compilation) may leave a partial last line in metrics.jsonl:
    the complete records still give figures, and the table says the run was cut."""
    spec = importlib.util.spec_from_file_location("gpu_throughput", REPO_ROOT / "bench" / "gpu_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text('{"kind": "train", "step": 5, "tokens_per_s": 10.0}\n{"kind": "eval", "step": 5}\n'
                       '{"kind": "train", "step": 10, "tokens_per_s": 30.0}\n{"kind": "tra')
    train = bench._train_records(metrics, tmp_path / "kept.jsonl")
    assert [r["step"] for r in train] == [5, 10]
    assert (tmp_path / "kept.jsonl").read_text() == metrics.read_text()
    assert bench._train_records(tmp_path / "missing.jsonl", tmp_path / "k2.jsonl") == []
    row = {"contender": "mft", "model": "m", "tokens_per_s": 30.0, "peak_gib": 1.0, "mfu": 0.5, "attention": "a",
           "compile": "c", "note": "killed at its 240s limit after step 10"}
    assert "| mft (killed at its 240s limit after step 10) | m | 30 |" in bench.format_table([row])
