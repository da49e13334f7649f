"""dataframebench (CC-BY-4.0, derived from BigCodeBench) from its PyPI wheel: the demo's four training tasks.

* ``dataframebench_package()``: the wheel, unpacked once into the cache (its data splits and its own evaluator);
  ``dataframebench_records(split)`` the raw records of a split (code evaluation reads the ``test`` split).
* ``prepare_dataframebench()``: its ``train`` split turned into MFT task directories of ``{"chat_rounds": [...]}``
  JSONL, one per task of ``DATAFRAMEBENCH_TASKS`` (``dataframebench_conversations`` writes the records; code
  evaluation prompts the ``test`` split the same way).
* ``DEMO_PROMPT``: the new problem ``make demo`` asks the fine-tuned model.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

from mft_components.assets.cache import MARKER, build_atomically, cache_root, run_pip

__all__ = ["DATAFRAMEBENCH_VERSION", "DATAFRAMEBENCH_TASKS", "DEMO_PROMPT", "dataframebench_conversations",
           "dataframebench_solution",
           "dataframebench_package", "dataframebench_records", "prepare_dataframebench"]

DATAFRAMEBENCH_VERSION = "0.1.1"
DATAFRAMEBENCH_DIRNAME = f"dataframebench-{DATAFRAMEBENCH_VERSION}-tasks"
# Bump when the conversations written from dataframebench change: an older cached directory is then rebuilt.
DATAFRAMEBENCH_FORMAT = 3


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


DATAFRAMEBENCH_TASKS = ("pandas_solution", "polars_solution", "pandas_to_polars", "unit_tests")


def _fence(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


def _strip_docstrings(code: str, cut_wrapper: bool = True) -> str:
    """Remove function docstrings: they repeat the task statement and would double the sequence length.

    ``cut_wrapper``: also cut the pandas ground truths' signature wrapper (below), as the training answers do.
    """
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
    for i, line in enumerate(lines if cut_wrapper else ()):
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


def dataframebench_solution(problem: dict, task: str) -> str | None:
    """The canonical solution of a problem for a task's answer (pandas for ``pandas_solution``, else polars), as
    code that passes the problem's tests: docstrings stripped, the pandas ground truths' signature wrapper kept
    (the tests call the wrapper's signature; the training answers leave it out). None without one."""
    library = "pandas" if task == "pandas_solution" else "polars"
    code = (problem.get("ground_truth") or {}).get(library) or ""
    return _strip_docstrings(code, cut_wrapper=False).strip() or None


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
    if (final / MARKER).exists():
        if json.loads((final / MARKER).read_text()).get("format") == DATAFRAMEBENCH_FORMAT:
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

    return build_atomically(final, build)


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
            run_pip(
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

    if not (final / MARKER).exists():
        print(f"mft: downloading dataframebench=={DATAFRAMEBENCH_VERSION} from PyPI into {final} (once)",
              file=sys.stderr)
    return build_atomically(final, build)


def dataframebench_records(split: str = "test", cache_dir: str | Path | None = None) -> list[dict]:
    """The raw records of a dataframebench split (``train``, ``val``, ``test``), from the cached wheel.

    Raises:
        ValueError: no such split.
    """
    path = dataframebench_package(cache_dir) / "dataframebench" / "data" / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"dataframebench has no split {split!r} (train, val, test)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
