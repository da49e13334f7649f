#!/usr/bin/env bash
# Issue 13's GPU checks in one device command: the CUDA tests (tests/test_gpu.py), then bench/gpu_throughput.py's
# core set on Llama-3.2-3B, within GPU_CHECK_BUDGET_S seconds (default 480) on the GPU machine of
# ../shared/device/README.md (torch 2.11+cu130; everything else carried in .device/).
#
#   here:   make install
#           DEVICE_EXTRA_WHEELS="liger-kernel==0.8.5 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0" \
#               bash ../shared/device/prepare.sh
#   there:  source .device/setup-remote.sh && bash bench/gpu_check.sh          (run tool: timeout_s 560)
#
# Everything lands in $OUT (the folder that comes back; ./gpu_check_out elsewhere):
#   env.txt                 GPU, driver, versions
#   pytest.log, junit.xml   the CUDA tests (each backend against sdpa, compiled vs eager and graph counts, QLoRA,
#                           activation checkpointing, liger, a step without host syncs, the recipe on CUDA)
#   bench/results.md|json   the throughput table so far (written after every contender) and each contender's log
#   RESULTS-GPU.md          bench/RESULTS-GPU.md with this run's dated table appended: commit it
# More contenders (other attentions, eager, liger, checkpointing modes, full fine-tuning, Qwen2.5-Coder-7B QLoRA):
#   source .device/setup-remote.sh && python3 bench/gpu_throughput.py --set all --out "$OUT/bench" --budget-s 540
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
budget=${GPU_CHECK_BUDGET_S:-480}
mkdir -p "$out"
start=$SECONDS

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 - <<'PY'
import importlib.metadata as m
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for p in ("transformers", "peft", "torchao", "torchdata", "liger-kernel", "triton", "pytest"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "-")
PY
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# 1. The CUDA tests (about 2 minutes, most of it compiling); the bench runs whatever they show.
timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py --junitxml="$out/junit.xml" \
  > "$out/pytest.log" 2>&1
echo "tests/test_gpu.py: exit $? ($(tail -1 "$out/pytest.log"))"

# 2. The throughput table in the time left (contenders that do not fit are listed as not run).
left=$(( budget - (SECONDS - start) - 15 ))
python3 bench/gpu_throughput.py --set core --out "$out/bench" --work /tmp/mft-gpu-models --budget-s "$left" \
  --contender-timeout 240 2>&1 | tee "$out/bench.log" | grep -vE "it/s\]|s/it\]"
cp bench/RESULTS-GPU.md "$out/RESULTS-GPU.md" 2>/dev/null
echo "gpu_check: $(( SECONDS - start ))s; results in $out"
