"""Tasks from `datasets` files: a Parquet file or directory, an Arrow ``save_to_disk`` directory, a JSON / JSONL file.

    data_paths:
      - data/sql.parquet                       a Parquet file (or a directory of them): a task named by its stem
      - data/tests_arrow                       a ``Dataset.save_to_disk`` directory (a DatasetDict: its ``train``)
      - path: data/problems.json               a mapping: the column of each record field, a split, a task name
        columns: {prompt: question, answer: solution}
        split: train
        name: problems

Read with the `datasets` library (``pip install 'mft[datasets]'``), memory-mapped: Parquet and JSON are converted
once into Arrow files under mft's cache (``datasets``' own cache format), an Arrow directory is mapped as it is. Each
row becomes one record, its fields the columns of the same names, or those that ``columns`` maps (then only
those): ``{prompt: question, answer: solution}`` reads the ``question`` and ``solution`` columns as a
``prompt``/``answer`` record; a ``messages`` or ``chat_rounds`` column of ``{role, content}`` lists is a
conversation. Rows are validated as JSONL lines are (``records.py``); a bad one is reported as
``path: row N: field: problem`` (N counts from 0, as ``dataset[N]``).

A plain ``.jsonl`` path stays mft's own line reader (``tokenize.py``); as a mapping it is read by `datasets`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mft_components.data.records import CONVERSATION_SHAPES, SINGLE_TURN_SHAPES, DataError

__all__ = ["TableSource", "RECORD_FIELDS", "table_source", "is_table_path", "load_table", "table_records",
           "table_fingerprint"]

# The record fields a column may be mapped to (records.py reads them).
RECORD_FIELDS = tuple(dict.fromkeys([*(shape[0] for shape in CONVERSATION_SHAPES),
                                     *(k for shape in SINGLE_TURN_SHAPES for k in shape), "system", "text"]))
_MAPPING_KEYS = ("path", "columns", "split", "name")


@dataclass(frozen=True)
class TableSource:
    """One task read with `datasets`.

    Attributes:
        path: the file or directory as the config gives it (expanded).
        kind: ``parquet``, ``arrow`` (a ``save_to_disk`` directory) or ``json``.
        files: the data files (their bytes key the tokenisation cache and the resume record).
        columns: ``(record field, column)`` pairs; empty: every column under its own name.
        split: the split of a ``DatasetDict`` directory (None: ``train``, or its only split).
    """

    path: Path
    kind: str
    files: tuple[Path, ...]
    columns: tuple[tuple[str, str], ...] = ()
    split: str | None = None

    def __str__(self) -> str:
        return str(self.path)


def is_table_path(path: Path) -> bool:
    """A file or directory that only `datasets` reads (not mft's JSONL reader)."""
    if path.is_file():
        return path.suffix in (".parquet", ".json", ".arrow")
    try:
        return path.is_dir() and (_is_saved_dataset(path) or (not any(path.rglob("*.jsonl"))
                                                              and any(path.rglob("*.parquet"))))
    except OSError:  # an unreadable directory: the JSONL reader names it
        return False


def _is_saved_dataset(path: Path) -> bool:
    """``Dataset.save_to_disk`` (state.json) or ``DatasetDict.save_to_disk`` (dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def table_source(entry: Any, where: str) -> tuple[str, TableSource] | None:
    """``(task name, source)`` of a ``data_paths`` entry read with `datasets`, or None for a JSONL entry.

    Raises:
        DataError: naming ``where`` (``data.data_paths[2]``): a mapping with unknown keys or no ``path``, a column
            mapped to a field records do not have, a missing path, a split that is not there.
    """
    if isinstance(entry, dict):
        unknown = [k for k in entry if k not in _MAPPING_KEYS]
        if unknown or not isinstance(entry.get("path"), str):
            raise DataError(f"{where}: expected a path, or a mapping with 'path' (and optional 'columns', 'split', "
                            f"'name'); got keys {sorted(entry)}")
        columns = entry.get("columns") or {}
        if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
            raise DataError(f"{where}.columns: expected a mapping of record field -> column name, got {columns!r}")
        bad = [k for k in columns if k not in RECORD_FIELDS]
        if bad:
            raise DataError(f"{where}.columns: {bad[0]!r} is not a record field; expected one of "
                            f"{', '.join(RECORD_FIELDS)}")
        path, split, name = Path(os.path.expanduser(entry["path"])), entry.get("split"), entry.get("name")
        for key, value in (("split", split), ("name", name)):
            if value is not None and not (isinstance(value, str) and value):
                raise DataError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    else:
        path, columns, split, name = Path(os.path.expanduser(str(entry))), {}, None, None
        if not is_table_path(path):
            return None
    if not path.exists():
        raise DataError(f"{where}: {path}: no such file or directory")
    if path.is_file():
        kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}.get(path.suffix)
        if kind is None:
            raise DataError(f"{where}: {path}: expected a .parquet, .json, .jsonl or .arrow file, or a directory")
        files = (path,)
    elif _is_saved_dataset(path):
        kind, files = "arrow", tuple(sorted(path.rglob("*.arrow")))
    else:
        kind, files = "parquet", tuple(sorted(path.rglob("*.parquet")))
        if not files:
            raise DataError(f"{where}: {path}: a directory with no *.parquet files and no saved dataset "
                            f"(state.json / dataset_dict.json)")
    task = name or (path.resolve().name if path.is_dir() else path.stem)
    return task, TableSource(path, kind, files, tuple(columns.items()), split)


def table_fingerprint(source: TableSource) -> str:
    """A hash of the files' bytes and of how they are read (kind, columns, split)."""
    h = hashlib.sha256(repr((source.kind, source.columns, source.split)).encode())
    for f in source.files:
        with open(f, "rb") as fh:
            h.update(f"{f.name}\0{hashlib.file_digest(fh, 'sha256').hexdigest()}\0".encode())
    return h.hexdigest()


def load_table(source: TableSource, cache_dir: Path | None):
    """The source as a memory-mapped ``datasets.Dataset``.

    Raises:
        DataError: `datasets` is not installed, the files cannot be read, the split is not there, or a mapped
            column is missing (each naming the path).
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source.path}: reading Parquet / Arrow / JSON tasks needs the `datasets` library: "
                        f"pip install 'mft[datasets]'") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    arrow_cache = str(cache_dir / "datasets") if cache_dir is not None else None
    try:
        if source.kind == "arrow" and source.path.is_dir():
            table = datasets.load_from_disk(str(source.path))
        elif source.kind == "arrow":
            table = datasets.Dataset.from_file(str(source.path))
        elif source.kind == "parquet":
            table = datasets.Dataset.from_parquet([str(f) for f in source.files], cache_dir=arrow_cache)
        else:
            table = datasets.Dataset.from_json(str(source.path), cache_dir=arrow_cache)
    except Exception as e:  # noqa: BLE001 - pyarrow, json and datasets each raise their own; the path says which
        raise DataError(f"{source.path}: cannot read it as {source.kind}: {type(e).__name__}: {e}") from None
    if isinstance(table, datasets.DatasetDict):
        splits = list(table)
        split = source.split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if split not in table:
            raise DataError(f"{source.path}: split {source.split or 'train'!r} not found; it has {splits} "
                            f"(give one: {{path: {source.path}, split: NAME}})")
        table = table[split]
    elif source.split not in (None, "train"):
        raise DataError(f"{source.path}: split {source.split!r} not found; it holds one dataset, no splits: leave "
                        f"split out")
    missing = [(field, column) for field, column in source.columns if column not in table.column_names]
    if missing:
        field, column = missing[0]
        raise DataError(f"{source.path}: columns.{field}: no column {column!r}; it has {table.column_names}")
    return table


def table_records(table, start: int, end: int, columns: tuple[tuple[str, str], ...]) -> Iterator[dict]:
    """Rows ``[start, end)`` as records: the mapped columns under their field names, else every column."""
    names = [column for _, column in columns] if columns else table.column_names
    batch = table.select_columns(names)[start:end]
    fields = [field for field, _ in columns] if columns else names
    for i in range(end - start):
        yield {field: batch[column][i] for field, column in zip(fields, names)}
