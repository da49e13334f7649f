#!/usr/bin/env bash
# For mft's developers (no GPU here): fill .device/ for bench/gpu_check.sh on the project's lent GPU machine (no
# network there), from any checkout of mft. bench/gpu_check.sh's header has the device commands.
#
#   make install && bash bench/gpu_prepare.sh
#
# It runs the shared ../shared/device/prepare.sh (the machine's own recipe: wheels of what the device image lacks,
# mft as a wheel, SmolLM2's tokenizer, the demo's tasks) with the wheels the GPU check needs on top
# (liger-kernel for the packed + liger baseline and the liger tests, pytest and its dependencies for
# tests/test_gpu.py), then checks that .device/ holds everything bench/gpu_check.sh imports there.
# The shared script assumes the main checkout (a .git directory, the shared folder at ../shared); in a git worktree
# (.git is a file, the shared folder elsewhere) it runs a copy with those two paths corrected. .device/ is
# git-ignored (.gitignore), so the device run must carry it: run tool carry [".device"].
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
shared=""
for d in ${MFT_DEVICE_DIR:-} ../shared/device ../../shared/device /work/shared/device; do
  if [ -f "$d/prepare.sh" ]; then shared=$(cd "$d" && pwd); break; fi
done
[ -n "$shared" ] || { echo "gpu_prepare: no shared device/prepare.sh found (set MFT_DEVICE_DIR)"; exit 1; }
git check-ignore -q .device/ || { echo "gpu_prepare: .device/ is not git-ignored; add /.device/ to .gitignore"; exit 1; }

# Beyond the shared list (torchao, torchdata, omegaconf, transformers, peft): transformers' own dependencies at the
# versions of constraints.txt (huggingface-hub, tokenizers, safetensors, kernels and what they import), so the GPU
# machine runs the transformers stack the CPU suite passed with rather than mixing ours with its image's (its
# transformers 5.17 / older hub); liger-kernel for the packed + liger baseline; pytest for tests/test_gpu.py.
# Computed from this venv's package metadata: the closure of those packages' requirements, pinned by constraints.txt.
closure=$(${PYTHON:-.venv/bin/python} - <<'PY'
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

pins = {}
for line in Path("constraints.txt").read_text().splitlines():
    if "==" in line and not line.startswith("#"):
        name, version = line.split("==")
        pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
skip = {"torch", "triton", "numpy"}  # the image's torch and its numpy stay
todo, seen = ["transformers", "kernels", "huggingface-hub", "tokenizers", "safetensors", "pytest"], set()
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen or name in skip or name.startswith("nvidia-"):
        continue
    seen.add(name)
    for text in metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12", "python_full_version": "3.12.0"}):
            todo.append(req.name)
print(" ".join(f"{n}=={pins[n]}" for n in sorted(seen) if n in pins))
PY
)
export DEVICE_EXTRA_WHEELS=${DEVICE_EXTRA_WHEELS:-"$closure liger-kernel==0.8.5"}
echo "gpu_prepare: carrying $DEVICE_EXTRA_WHEELS"
if [ -d .git ] && [ "$shared" = "$(cd .. && pwd)/shared/device" ]; then
  bash "$shared/prepare.sh"
else
  patched=$(mktemp); trap 'rm -f "$patched"' EXIT
  sed -e "s#\.\./shared/device/#$shared/#g" \
      -e "s#^grep -qx '/.device/' .git/info/exclude.*#: .device/ is ignored by .gitignore#" "$shared/prepare.sh" > "$patched"
  if grep -q '\.\./shared/device/\|\.git/info/exclude' "$patched"; then
    echo "gpu_prepare: $shared/prepare.sh changed; cannot adapt it to this worktree (run it from the main checkout)"
    exit 1
  fi
  bash "$patched"
fi

# The check: every distribution the GPU run imports is either on the device image or carried here.
py=${PYTHON:-.venv/bin/python}
"$py" - <<'PY'
import re
import sys
import zipfile
from pathlib import Path

carried = {re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower() for w in Path(".device/whl").glob("*.whl")}
need = ["mft", "transformers", "peft", "torchao", "torchdata", "omegaconf", "liger_kernel", "pytest", "pluggy",
        "iniconfig", "pygments", "huggingface_hub", "tokenizers", "safetensors", "kernels"]
missing = [n for n in need if n not in carried]
for d in ("tok", "data"):
    if not any(Path(".device", d).iterdir()):
        missing.append(f".device/{d}/ (empty)")
if not Path(".device/setup-remote.sh").is_file():
    missing.append(".device/setup-remote.sh")
# mft's wheel must hold every module of this checkout (a `mft run` there imports the installed copy)
for wheel in Path(".device/whl").glob("mft-*.whl"):
    modules = {p.as_posix() for p in Path("mft_components").rglob("*.py")}
    missing += sorted(modules - set(zipfile.ZipFile(wheel).namelist()))
size = sum(f.stat().st_size for f in Path(".device").rglob("*") if f.is_file())
print(f"gpu_prepare: .device/ holds {size / 2**20:.1f} MiB (the run tool carries at most 64 MiB)")
if missing or size > 60 * 2**20:
    sys.exit(f"gpu_prepare: not ready: missing {missing}" if missing else "gpu_prepare: .device/ is too large to carry")
print('gpu_prepare: ready. GPU session: run tool, carry [".device"], timeout_s 590, one command per part:\n'
      "  source .device/setup-remote.sh && bash bench/gpu_check.sh bench\n"
      "  source .device/setup-remote.sh && bash bench/gpu_check.sh bench-ac\n"
      "  source .device/setup-remote.sh && bash bench/gpu_check.sh tests")
PY
