"""FSDP2 (2 CPU processes, gloo) computes what one process computes: loss, adapter gradients, gathered adapters."""

from pathlib import Path

import pytest
import torch

from mft_components.distributed import all_reduce_sum, get_rank, init_distributed, is_distributed
from mft_components.models.parallelize import gather_state_dict
from tests.conftest import run_torchrun
from tests.tiny_models import make_tiny_model_dir

SCRIPT = Path(__file__).parent / "dist" / "fsdp_model_check.py"


def test_single_process_helpers():
    assert not is_distributed()
    assert init_distributed()[:2] == (0, 1)
    t = torch.ones(3)
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0, 1.0]
    assert get_rank() == 0
    lin = torch.nn.Linear(4, 2)
    sd = gather_state_dict(lin, adapter_only=False)
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], lin.weight.detach())


@pytest.mark.slow
def test_fsdp2_matches_single_process(tmp_path):
    """LoRA, QLoRA (NF4 shards) and full on llama, QLoRA on qwen3_moe (sharded stacked experts), one torchrun."""
    specs = {"llama": ["lora", "qlora", "full"], "qwen3_moe": ["qlora"]}
    dirs = {f: make_tiny_model_dir(tmp_path / f, f, vocab_size=1024) for f in specs}
    proc = run_torchrun(SCRIPT, *(f"{dirs[f]}={','.join(m)}" for f, m in specs.items()))
    for family, methods in specs.items():
        for method in methods:
            assert f"OK {dirs[family]} {method}" in proc.stdout
