#!/usr/bin/env bash
# Issue 13's GPU checks in one device command: bench/gpu_throughput.py's core set on Llama-3.2-3B, then the CUDA
# tests (tests/test_gpu.py), within GPU_CHECK_BUDGET_S seconds (default 540) on the GPU machine of
# ../shared/device/README.md (torch 2.11+cu130; everything else carried in .device/). docs/gpu.md has the steps:
#
#   here:   make install && bash bench/gpu_prepare.sh
#   there:  run tool, carry [".device"], timeout_s 590:
#           source .device/setup-remote.sh && bash bench/gpu_check.sh
#
# Everything lands in $OUT (the folder that comes back; ./gpu_check_out elsewhere):
#   env.txt                 GPU, driver, versions, and every import the run needs (what failed, and a fallback)
#   bench/results.md|json   the throughput table so far (written after every contender), each contender's log
#                           and metrics.jsonl (its checkpoint stays on the machine)
#   RESULTS-GPU.md          bench/RESULTS-GPU.md with this run's dated table appended: commit it
#   pytest.log, junit.xml   the CUDA tests, one line per test as it ends (each backend against sdpa, compiled vs
#                           eager and graph counts, a step without host syncs, the recipe on CUDA, QLoRA,
#                           checkpointing, liger); junit.xml only when they all end in time
# Time: the bench gets the budget less GPU_CHECK_TEST_S (default 200 s): it starts no contender with less than a
# minute of that left and cuts a running one at its end (keeping what it logged); the tests get the rest. With
# ~20 s of wheel installation before it, the whole command ends within ~570 s (run tool timeout_s 590).
# Contenders and tests that did not fit, in a second command if the device time allows:
#   source .device/setup-remote.sh && python3 bench/gpu_throughput.py --contenders mft-ac,mft-qlora-ac,hf-padded \
#       --out "$OUT/bench" --work /tmp/mft-gpu-models --budget-s 500 --contender-timeout 300; cp bench/RESULTS-GPU.md "$OUT/"
#   (--set all: every variant, Qwen2.5-Coder-7B QLoRA included)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
budget=${GPU_CHECK_BUDGET_S:-540}
test_s=${GPU_CHECK_TEST_S:-200}
work=${GPU_CHECK_WORK:-/tmp/mft-gpu-models}
site=${GPU_CHECK_SITE:-/tmp/site}  # where .device/setup-remote.sh installs the carried wheels
mkdir -p "$out"
start=$SECONDS

imports() {  # every module the tests and the bench import; prints what fails
  python3 - <<'PY'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
failed = []
for name in ("transformers", "peft", "torchao", "torchdata", "omegaconf", "yaml", "safetensors", "tokenizers",
             "pytest", "liger_kernel.transformers", "torch.nn.attention.flex_attention", "torch.nn.attention.varlen",
             "mft_components.models", "mft_components.data", "mft_components.training.metrics"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", ""), "from", getattr(module, "__file__", "?"))
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the check
        failed.append(name)
        print(f"IMPORT FAILED {name}: {type(e).__name__}: {e}"[:400])
print("failed:", " ".join(failed) or "none")
PY
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 --version
  report=$(imports 2>&1); echo "$report"
  # The carried transformers (ours) needs huggingface_hub >= 1.31; should the image's be older, the image's own
  # transformers takes over (mft supports >= 4.51; the CPU suite passes with torch 2.11 + transformers 5.17).
  if grep -q "^IMPORT FAILED transformers" <<<"$report"; then
    carried=$(python3 -c 'import importlib.util as u; print(u.find_spec("transformers").submodule_search_locations[0])')
    if [ "$(dirname "$carried")" = "$site" ]; then
      echo "preflight: the carried transformers does not import; moving it aside for the image's"
      for f in "$carried" "$site"/transformers-*.dist-info; do mv "$f" "$f.off"; done
      imports 2>&1
    fi
  fi
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# 1. The throughput table first (the figures issue 13 asks for), in the order of SETS["core"] while its share of
#    the budget lasts: contenders that do not fit are listed as not run, one cut at its limit keeps what it logged.
bench_s=$(( budget - test_s - (SECONDS - start) ))
python3 bench/gpu_throughput.py --set core --out "$out/bench" --work "$work" --budget-s "$bench_s" \
  --contender-timeout 240 2>&1 | tee "$out/bench.log" | grep -vE "it/s\]|s/it\]"
cp bench/RESULTS-GPU.md "$out/RESULTS-GPU.md" 2>/dev/null
rm -rf "$work/runs"

# 2. The CUDA tests in the time left (GPU_CHECK_TEST_S or more): one line per test in pytest.log as it ends.
left=$(( budget - (SECONDS - start) ))
[ "$left" -lt 60 ] && left=60
timeout -k 10 "$left" python3 -m pytest -v -rs -p no:cacheprovider --durations=0 tests/test_gpu.py \
  --junitxml="$out/junit.xml" > "$out/pytest.log" 2>&1
rc=$?
if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
  echo "tests/test_gpu.py: cut at ${left}s (pytest.log has the tests that ended)"
else
  echo "tests/test_gpu.py: exit $rc ($(tail -1 "$out/pytest.log"))"
fi
grep "::" "$out/pytest.log" | grep -E " (PASSED|FAILED|ERROR|SKIPPED)" | sed 's/^/  /'
echo "gpu_check: $(( SECONDS - start ))s; results in $out"
