"""GGUF export of the demo model: `mft export --gguf` against llama.cpp's converter run by hand on the same export.

    python bench/gguf_export.py [--types f16 q8_0] [--repeats 2] [--workdir DIR]

Builds what the demo trains (SmolLM2-135M-Instruct, LoRA r16 on q/k/v/o/gate/up/down, ``lora_b`` made non-zero so
the merge does something), saves it as a training checkpoint, exports it (``mft export CKPT -o OUT``, timed), and
then times in the same run, interleaved:

* ``mft export OUT --gguf --gguf-type T --force``: mft's GGUF step on that export (the same step
  ``mft export CKPT -o OUT --gguf`` runs after the Hugging Face export);
* by hand: ``python convert_hf_to_gguf.py OUT --outtype T --outfile ...`` on the same export, with the converter
  mft pins (what a user would run after ``mft export``).

Prints wall times, the GGUF sizes, and whether the two files are the same bytes (sha256) and hold the same tensors
(names, types, shapes and data, read with the ``gguf`` package).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mft_components.assets.cache import file_sha256  # noqa: E402 (after the path it is found on)


def tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), hashlib.sha256(t.data.tobytes()).hexdigest())
            for t in GGUFReader(path).tensors}


def make_checkpoint(root: Path) -> Path:
    from mft_components.assets import prepare_smollm2
    from mft_components.data.templates import ChatFormat
    from mft_components.models import build_model
    from mft_components.models.lora import (adapter_to_peft_state_dict, get_adapter_state_dict, lora_target_names,
                                            peft_adapter_config)
    from mft_components.training import checkpoint as ckpt

    base = prepare_smollm2()
    lora = {"rank": 16, "alpha": 32.0, "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    torch.manual_seed(0)
    model = build_model(str(base), method="lora", lora=lora, dtype="fp32")
    with torch.no_grad():
        for name, p in model.hf_model.named_parameters():
            if "lora_b" in name:
                p.normal_(0.0, 0.01)
    meta = {"method": "lora", "base_model_dir": str(base), "chat_format": ChatFormat().to_dict(),
            "eos_token": "<|im_end|>", "task_names": ["bench"], "lora": lora}
    config = peft_adapter_config(base, 16, 32.0, 0.0, lora_target_names(model.hf_model), False)
    weights = adapter_to_peft_state_dict(get_adapter_state_dict(model))
    return ckpt.save_checkpoint(root / "run", 1, weights=weights, meta=meta, adapter_config=config)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children): on a shared machine the wall time also holds
    the wait for a core, the CPU time does not."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    args = parser.parse_args()
    from mft_components.assets.llama_cpp import LLAMA_CPP_COMMIT, LLAMA_CPP_PYTHON_VERSION, prepare_llama_cpp_converter

    converter = prepare_llama_cpp_converter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mft-bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# GGUF export of SmolLM2-135M-Instruct (LoRA r16 merged), {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} "
          f"(llama.cpp {LLAMA_CPP_COMMIT[:10]})")
    checkpoint = make_checkpoint(work)
    out = work / "export"
    cli = [sys.executable, str(REPO / "cli.py"), "export"]
    try:
        shutil.rmtree(out, ignore_errors=True)
        wall, cpu = timed([*cli, str(checkpoint), "-o", str(out)])
        print(f"Hugging Face export (`mft export CKPT -o OUT`, merge + fp32 safetensors): {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU\n")
        print(f"GGUF of that export, best of {args.repeats} runs each, interleaved (the machine's load hits both); "
              f"CPU = user + system time of the process tree:\n")
        print("| type | `mft export OUT --gguf` wall / CPU | converter by hand wall / CPU | ratio wall / CPU | GGUF size | "
              "same bytes | same tensors |")
        print("|---|---|---|---|---|---|---|")
        for gguf_type in args.types:
            ours, by_hand = out / f"model-{gguf_type}.gguf", work / f"by-hand-{gguf_type}.gguf"
            ours_t, hand_t = [], []
            for _ in range(args.repeats):
                ours_t.append(timed([*cli, str(out), "--gguf", "--gguf-type", gguf_type, "--force"]))
                hand_t.append(timed([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(out),
                                     "--outtype", gguf_type, "--outfile", str(by_hand)]))
            (ow, oc), (hw, hc) = [tuple(min(x[i] for x in t) for i in (0, 1)) for t in (ours_t, hand_t)]
            same_bytes = file_sha256(ours) == file_sha256(by_hand)
            same_tensors = tensors(ours) == tensors(by_hand)
            print(f"| {gguf_type} | {ow:.1f} / {oc:.1f} s | {hw:.1f} / {hc:.1f} s | {ow / hw:.2f}x / {oc / hc:.2f}x | "
                  f"{ours.stat().st_size / 2**20:.1f} MiB | {'yes' if same_bytes else 'no'} | "
                  f"{'yes' if same_tensors else 'no'} |")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
