"""torchrun script: code evaluation under FSDP2 gives the single-process answers and gathers every verdict.

Usage: torchrun --nproc-per-node 2 tests/dist/code_eval_check.py MODEL_DIR EVAL_FILE
Each rank generates its share of the prompts (uneven: one rank runs a throw-away batch to keep the collective
forwards in step) with the sharded in-training model (sdpa_varlen attention, LoRA not merged); every rank checks
the gathered answers against an unsharded copy of the same model answering every prompt. Then programs that
keep one rank busy for longer than the process group's timeout are still gathered. Rank 0 prints OK.
"""

import sys

import torch
from transformers import AutoTokenizer

from mft_components.code_eval.evaluate import evaluate_code, load_tasks, make_sandbox
from mft_components.code_eval.options import CodeEvalOptions
from mft_components.inference.decoding import generate_batched
from mft_components.distributed import destroy_distributed, end_worker, init_distributed
from mft_components.models import build_model
from mft_components.data.templates import ChatFormat


def build(model_dir: str, distributed: bool, device):
    torch.manual_seed(0)
    model = build_model(model_dir, method="lora", dtype="fp32", attn_implementation="sdpa_varlen",
                        distributed=distributed, device=device)
    torch.manual_seed(5)  # lora_b non-zero, the same on every rank, so the adapter changes the answers
    for name, p in model.named_parameters():
        if ".lora_b." in name:
            full = torch.randn(p.shape) * 0.3
            if hasattr(p, "_local_tensor"):
                from torch.distributed.tensor import distribute_tensor
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.data.copy_(full)
    return model


def main(model_dir: str, eval_file: str) -> None:
    rank, world, device = init_distributed()
    tok = AutoTokenizer.from_pretrained(model_dir)
    fmt = ChatFormat()
    prompts = [fmt.prompt_ids([{"role": "user", "content": "x" * (3 * n + 1)}], tok) for n in range(5)]
    ref = build(model_dir, False, device)
    model = build(model_dir, True, device)
    model.train()
    kwargs = dict(eos_token_id=tok.eos_token_id, max_new_tokens=6, batch_size=2)
    expected = [g.new_ids for g in generate_batched(ref, prompts, **kwargs)]
    mine = generate_batched(model, prompts[rank::world], min_batches=2, **kwargs)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, [g.new_ids for g in mine])
    got = [gathered[i % world][i // world] for i in range(len(prompts))]
    assert got == expected, (got, expected)
    assert model.training and model.config._attn_implementation == "sdpa_varlen"

    # The whole evaluation: greedy and sampled answers split over ranks, verdicts gathered on every rank.
    options = CodeEvalOptions(tasks={"t": eval_file}, num_samples=2, max_new_tokens=4, batch_size=2, timeout_s=5,
                              isolation="process")  # (what is checked here is the gathering, not the isolation)
    tasks = load_tasks(options)
    result = evaluate_code(model, tok, fmt, tasks, options, make_sandbox(options))
    n = len(tasks["t"])
    assert len(result.records) == 3 * n, len(result.records)
    assert [(r["index"], r["sample"]) for r in result.records] == [
        (i, s) for i in range(n) for s in ("greedy", 0, 1)]
    assert result.metrics["task_problems"] == {"t": n} and result.metrics["pass@1"] == 0.0
    greedy_ref = generate_batched(ref, [fmt.prompt_ids(p.messages, tok) for p in tasks["t"]],
                                  eos_token_id=tok.eos_token_id, max_new_tokens=4, batch_size=2)
    assert [r["completion"] for r in result.records if r["sample"] == "greedy"] == [
        tok.decode(g.new_ids, skip_special_tokens=False) for g in greedy_ref]

    # Ranks whose programs take longer than the process group's timeout apart (rank 1's sleeps 4 s, rank 0's is
    # done at once; timeout 2 s) still meet: they wait for each other in step, not inside the gather.
    import datetime
    import json
    from pathlib import Path

    from torch.distributed.distributed_c10d import _set_pg_timeout

    from mft_components.code_eval.evaluate import execute_answers
    from mft_components.inference.decoding import Generated
    from mft_components.code_eval.suites import read_eval_file

    uneven = Path(eval_file).with_name(f"uneven.{rank}.jsonl")  # one file per rank: no rank reads it half-written
    uneven.write_text("".join(json.dumps({"task_id": t, "prompt": "p", "test": test}) + "\n" for t, test in (
        ("quick", "assert x == 1"), ("slow", "import time\ntime.sleep(4)\nassert x == 1"))))
    problem = read_eval_file(str(uneven))[rank]
    answer = Generated(new_ids=tok.encode("```python\nx = 1\n```"), finished=True)
    _set_pg_timeout(datetime.timedelta(seconds=2))
    # (these programs run under the strongest isolation here, bubblewrap in CI: two ranks leasing uids at once)
    from dataclasses import replace

    from mft_components.code_eval.sandbox import SandboxError

    try:
        sandbox = make_sandbox(replace(options, isolation="auto"))
    except SandboxError:
        sandbox = make_sandbox(options)
    import shutil

    assert not shutil.which("bwrap") or sandbox.isolation.startswith("bubblewrap"), sandbox.isolation
    records, seconds = execute_answers([("t", rank, problem, "greedy")], [answer], tok, sandbox)
    assert [(r["task_id"], r["status"]) for r in records] == [("quick", "passed"), ("slow", "passed")], records
    assert seconds >= 4, seconds
    _set_pg_timeout(datetime.timedelta(minutes=5))

    destroy_distributed()
    if rank == 0:
        print("OK")


if __name__ == "__main__":
    main(*sys.argv[1:])
    end_worker()
