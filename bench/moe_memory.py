"""Memory of LoRA on MoE experts (models/expert_lora.py): a tiny Qwen3-MoE-shaped model on the CPU, measured, and
the same accounting for Mixtral-8x7B and Qwen3-30B-A3B sizes, computed.

    python bench/moe_memory.py [--work-dir DIR]

Measured (each in a fresh process, bf16, one micro-batch of 1 x 256 tokens, activation checkpointing off): parameter
bytes by kind (NF4 / frozen / trainable) and the peak host memory of build + one forward/backward, over the RSS
before it (sampled every 2 ms), for
  lora attention      the default targets (attention only): the baseline
  lora +experts       target_modules [q_proj, k_proj, v_proj, o_proj, experts, router]
  qlora +experts      the same over an NF4 base (experts in NF4 too)

Computed for real sizes (rank 16, bf16 compute): the experts' weights in bf16 and NF4, the expert adapters and their
AdamW state (bf16 weights and grads, two fp32 moments: 12 bytes a parameter), and the transient of one MoE layer in
training: the adapted dense weight W + scale*B@A [E, out, in] built in its forward, and its gradient in backward
(2 x the layer's expert weights in bf16; with activation checkpointing only one layer's at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, an int8 scale per 64-block, an fp32 scale per 256 scales
SIZES = {  # layers, hidden, expert width, experts, (attention + dense) params per layer (approximate)
    "Mixtral-8x7B": dict(layers=32, hidden=4096, inter=14336, experts=8),
    "Qwen3-30B-A3B": dict(layers=48, hidden=2048, inter=768, experts=128),
}
RANK = 16


def make_model(path: Path) -> None:
    import torch
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_experts=16,
        num_experts_per_tok=4, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
        decoder_sparse_step=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(model_dir: str, variant: str) -> dict:
    """Runs in a fresh process: peak RSS is per process."""
    import gc
    import threading
    import time

    import torch

    from mft_components.models import build_model, param_bytes

    method = "qlora" if variant.startswith("qlora") else "lora"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["experts", "router"] if "experts" in variant else [])
    gc.collect()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    model = build_model(model_dir, method=method, dtype="bf16", lora={"rank": RANK, "alpha": 32,
                                                                        "target_modules": targets})
    ids = torch.randint(0, 4096, (1, 256), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "position_ids": torch.arange(256)[None],
             "sample_ids": torch.zeros_like(ids)}
    losses, aux = model(batch)
    (losses.mean() + 0.001 * aux).backward()
    done.set()
    thread.join()
    return {"variant": variant, "peak_mib": (peak[0] - base) / 2**20,
            **{k: v / 2**20 for k, v in param_bytes(model).items()}}


def formula(name: str, layers: int, hidden: int, inter: int, experts: int) -> dict:
    expert_params = layers * experts * 3 * hidden * inter
    adapter_params = layers * experts * RANK * (2 * hidden + 3 * inter)  # gate_up: A r*H, B 2I*r; down: A r*I, B H*r
    gib = 2**30
    return {"model": name, "experts_bf16_gib": expert_params * 2 / gib, "experts_nf4_gib": expert_params * NF4_BYTES / gib,
            "adapter_params_m": adapter_params / 1e6, "adapter_train_gib": adapter_params * 12 / gib,
            "layer_transient_gib": 2 * experts * 3 * hidden * inter * 2 / gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL_DIR VARIANT
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="moe_memory_"))
    model_dir = work / "qwen3_moe_tiny"
    if not (model_dir / "config.json").is_file():
        make_model(model_dir)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    for variant in ("lora attention", "lora +experts", "qlora +experts"):
        out = subprocess.run([sys.executable, __file__, "--measure", str(model_dir), variant], env=env,
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("tiny Qwen3-MoE (4 layers, hidden 256, 16 experts of width 256, top-4), bf16, 1 x 256 tokens, CPU")
    print(f"{'variant':<16}{'NF4 MiB':>9}{'frozen MiB':>12}{'trainable MiB':>15}{'build+step peak MiB':>21}"
          f"{'peak / baseline':>17}")
    for r in rows:
        print(f"{r['variant']:<16}{r['nf4']:>9.1f}{r['frozen']:>12.1f}{r['trainable']:>15.2f}{r['peak_mib']:>21.1f}"
              f"{r['peak_mib'] / rows[0]['peak_mib']:>17.2f}")
    print(f"\nreal sizes, rank {RANK} on every expert (computed):")
    print(f"{'model':<15}{'experts bf16 GiB':>17}{'experts NF4 GiB':>17}{'adapter params M':>18}"
          f"{'adapter+AdamW GiB':>19}{'1-layer transient GiB':>23}")
    for name, size in SIZES.items():
        f = formula(name, **size)
        print(f"{name:<15}{f['experts_bf16_gib']:>17.1f}{f['experts_nf4_gib']:>17.1f}{f['adapter_params_m']:>18.1f}"
              f"{f['adapter_train_gib']:>19.2f}{f['layer_transient_gib']:>23.2f}")


if __name__ == "__main__":
    main()
