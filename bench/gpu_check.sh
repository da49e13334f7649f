#!/usr/bin/env bash
# The GPU check of mft on a CUDA machine: the throughput table of bench/gpu_throughput.py on Llama-3.2-3B and
# the CUDA tests (tests/test_gpu.py). In a checkout of mft with its environment installed (docs/gpu.md):
#
#   bash bench/gpu_check.sh            # everything: bench, bench-ac, then tests (about 25 min on one H100/H200)
#   bash bench/gpu_check.sh bench      # the shipped defaults (mft), hf-packed-liger, QLoRA (mft-qlora)
#   bash bench/gpu_check.sh bench-ac   # activation checkpointing: mft-ac, mft-qlora-ac, then hf-padded
#   bash bench/gpu_check.sh tests      # tests/test_gpu.py
#
# Each part keeps to GPU_CHECK_BUDGET_S seconds (default 540): a contender that would start with less than a
# minute left is listed as not run, a running one is cut at the end and keeps the log intervals it finished.
# A 3B contender costs 1.5-2.5 min, most of it compiling the layer graphs; QLoRA's NF4 graphs are compiled again
# in every run (inductor's caches do not hold them), so the QLoRA rows cost the most: three contenders per part.
#
# Everything lands in $OUT (./gpu_check_out by default), appended to by each part:
#   env.txt                 GPU, driver, versions, every import the run needs, and every installed version that
#                           differs from constraints.txt (the versions the CPU suite passed with)
#   bench/, bench-ac/       each part's throughput table so far (results.md|json, written after every contender),
#                           each contender's log and metrics.jsonl; bench.log, bench-ac.log: the parts' output
#   RESULTS-GPU.md          bench/RESULTS-GPU.md with the dated tables of the parts run appended (one call per
#                           part on a fresh copy of the tree: each brings back its own table)
#   pytest.log, junit.xml   the CUDA tests, one line per test as it ends; junit.xml when they all end in time
#
# For mft's developers on the project's lent GPU machine (no network, 10-minute commands; torch 2.11+cu130 there):
# here `make install && bash bench/gpu_prepare.sh` fills the git-ignored .device/ (wheels of everything the image
# lacks or has in other versions, at constraints.txt's versions: transformers, huggingface-hub, tokenizers,
# safetensors, kernels, ...; mft itself; SmolLM2's tokenizer; the demo's tasks). Then one run-tool call per part,
# carry [".device"], timeout_s 590 (~20 s of wheel installation, then the part's 540 s):
#   source .device/setup-remote.sh && bash bench/gpu_check.sh bench
#   source .device/setup-remote.sh && bash bench/gpu_check.sh bench-ac
#   source .device/setup-remote.sh && bash bench/gpu_check.sh tests
# Commit the RESULTS-GPU.md that comes back as bench/RESULTS-GPU.md; env.txt, bench/*.log and pytest.log say what
# failed and why. Other contenders (--set all: other attentions, eager, liger, every_other/selective, full
# fine-tuning, Qwen2.5-Coder-7B QLoRA): python3 bench/gpu_throughput.py --contenders ... --budget-s 500.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
case "$part" in all|bench|bench-ac|tests) ;; *) echo "usage: bash bench/gpu_check.sh [all|bench|bench-ac|tests]"; exit 2 ;; esac
out=${OUT:-gpu_check_out}
budget=${GPU_CHECK_BUDGET_S:-540}
work=${GPU_CHECK_WORK:-/tmp/mft-gpu-models}
mkdir -p "$out"

environment() {  # GPU, versions, every module the tests and the bench import, and what differs from constraints.txt
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  python3 --version
  python3 - <<'PY'
import importlib
import re
from importlib import metadata
from pathlib import Path

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
failed = []
for name in ("transformers", "huggingface_hub", "tokenizers", "safetensors", "kernels", "peft", "torchao",
             "torchdata", "omegaconf", "yaml", "pytest", "liger_kernel.transformers",
             "torch.nn.attention.flex_attention", "torch.nn.attention.varlen", "mft_components.models",
             "mft_components.data", "mft_components.training.metrics"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", ""), "from", getattr(module, "__file__", "?"))
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the check
        failed.append(name)
        print(f"IMPORT FAILED {name}: {type(e).__name__}: {e}"[:400])
print("failed:", " ".join(failed) or "none")
differ = []
for line in Path("constraints.txt").read_text().splitlines():
    if "==" not in line or line.startswith("#"):
        continue
    name, want = line.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        continue  # not needed on the GPU (the eval suites' libraries, tensorboard, ...)
    if re.sub(r"\+.*", "", have) != want.strip():
        differ.append(f"{name} {have} (tested: {want.strip()})")
print("versions other than constraints.txt's:", "; ".join(differ) or "none")
PY
}

bench() {  # $1: the part's name (its folder in $OUT), $2: its contenders, in order, within the budget
  local start=$SECONDS
  python3 bench/gpu_throughput.py --contenders "$2" --out "$out/$1" --work "$work" \
    --budget-s $(( budget - 20 )) --contender-timeout 240 2>&1 | tee -a "$out/$1.log" | grep -vE "it/s\]|s/it\]"
  cp bench/RESULTS-GPU.md "$out/RESULTS-GPU.md" 2>/dev/null
  rm -rf "$work/runs"
  echo "gpu_check $part: $2 in $(( SECONDS - start ))s"
}

tests() {
  local start=$SECONDS
  timeout -k 10 "$budget" python3 -m pytest -v -rs -p no:cacheprovider --durations=0 tests/test_gpu.py \
    --junitxml="$out/junit.xml" > "$out/pytest.log" 2>&1
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "tests/test_gpu.py: cut at ${budget}s (pytest.log has the tests that ended)"
  else
    echo "tests/test_gpu.py: exit $rc ($(tail -1 "$out/pytest.log")) in $(( SECONDS - start ))s"
  fi
  grep "::" "$out/pytest.log" | grep -E " (PASSED|FAILED|ERROR|SKIPPED)" | sed 's/^/  /'
}

environment > "$out/env.txt" 2>&1
cat "$out/env.txt"
[ "$part" = all ] || [ "$part" = bench ] && bench bench mft,hf-packed-liger,mft-qlora
[ "$part" = all ] || [ "$part" = bench-ac ] && bench bench-ac mft-ac,mft-qlora-ac,hf-padded
[ "$part" = all ] || [ "$part" = tests ] && tests
echo "gpu_check $part: done; results in $out"
