"""Parameter memory and loading peak of build_model for full / LoRA / QLoRA on a ~100M-parameter Llama.

    python bench/model_memory.py [--work-dir DIR]

Builds a Llama-architecture model from a config (12 layers, hidden 768, GQA 12/4, MLP 2048, vocab 32000),
saves it in bf16 as two safetensors shards, then, for each method, in a fresh process: builds it with
`mft_components.models.build_model(dtype="bf16")` and reports parameter bytes, the peak host memory added while
loading (current RSS sampled every 2 ms during build_model, minus RSS before it), and trainable parameters. Targets (issue 4):
  QLoRA decoder-linear weights <= 0.33x their bf16 bytes;  load peak <= final model bytes + 1.5x largest shard.
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


def make_model(path: Path) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="120MB")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(model_dir: str, method: str) -> dict:
    """Runs in a fresh process: peak RSS is per process."""
    import torch

    from mft_components.models.lora import LoRALinear, NF4Linear
    from mft_components.models import build_model, param_bytes

    # ru_maxrss is a high-water mark that imports may already have set: sample the current RSS instead.
    import gc
    import threading
    import time

    gc.collect()
    base_rss = _rss()
    samples = [base_rss]
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append(_rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    model = build_model(model_dir, method=method, dtype="bf16")
    done.set()
    thread.join()
    peak = max(samples + [_rss()]) - base_rss
    layer_weights = [m.weight for m in model.decoder_layers().modules() if isinstance(m, (torch.nn.Linear, LoRALinear, NF4Linear))
                     and m.weight.dim() == 2 and m.weight.shape[0] > 64]
    bytes_ = param_bytes(model)
    return {
        "method": method,
        "param_bytes": bytes_,
        "total_param_bytes": sum(bytes_.values()),
        "layer_linear_numel": sum(w.numel() for w in layer_weights),
        "load_peak_bytes": peak,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--measure", nargs=2, metavar=("MODEL_DIR", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print("RESULT " + json.dumps(measure(*args.measure)))
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mft-bench-"))
    model_dir = work / "llama-100m"
    if not (model_dir / "config.json").exists():
        make_model(model_dir)
    shards = sorted(model_dir.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    print(f"model: {model_dir} ({len(shards)} shards, largest {largest / 2**20:.1f} MiB); torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    results = {}
    for method in ("full", "lora", "qlora"):
        out = subprocess.run([sys.executable, __file__, "--measure", str(model_dir), method], capture_output=True,
                             text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            print(out.stdout[-3000:], out.stderr[-3000:])
            return 1
        results[method] = r = json.loads(line[0][len("RESULT "):])
        target = r["total_param_bytes"] + 1.5 * largest
        print(f"{method:6s} params {r['total_params'] / 1e6:7.2f}M  trainable {r['trainable']:>11,}  "
              f"param bytes {r['total_param_bytes'] / 2**20:7.1f} MiB {r['param_bytes']}  "
              f"load peak {r['load_peak_bytes'] / 2**20:7.1f} MiB (target <= {target / 2**20:.1f} MiB: "
              f"{'OK' if r['load_peak_bytes'] <= target else 'MISSED'})")
    q = results["qlora"]
    bf16_bytes = q["layer_linear_numel"] * 2
    ratio = q["param_bytes"]["nf4"] / bf16_bytes
    print(f"QLoRA decoder-linear weights: {q['param_bytes']['nf4'] / 2**20:.1f} MiB NF4 vs {bf16_bytes / 2**20:.1f} MiB bf16 "
          f"= {ratio:.3f}x (target <= 0.33x: {'OK' if ratio <= 0.33 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
