"""The ``data:`` node's builder: options checked, tasks found, records tokenised (cached), each task split.

    build_mft_data(tokenizer, data_paths=..., seq_len=..., packing=..., ...) -> MFTData

Every option is checked before a record is read, each by the module that owns it (``packing.py`` the packing,
``sampling.py`` the task sampling, ``tokenize.py`` the truncation, ``templates.py`` the chat format), so a typo
costs seconds, not a tokenisation; ``mft validate`` runs the same checks (``resolve_data_config``). Bad records
stop the build with up to ``MAX_LISTED_PROBLEMS`` of them listed as ``path:line: field: problem``
(``on_bad_record: error``), or are dropped and counted per task (``skip``).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mft_components.assets.cache import cache_root
from mft_components.data.dataset import MFTData, Sample, split_task
from mft_components.data.packing import check_packing
from mft_components.data.records import DataError
from mft_components.data.sampling import check_task_sampling
from mft_components.data.tables import TableSource
from mft_components.data.tasks import discover_tasks
from mft_components.data.templates import ChatFormat
from mft_components.data.tokenize import check_truncation, tokenize_files

__all__ = ["BAD_RECORD_MODES", "MAX_LISTED_PROBLEMS", "LENGTH_WARNING_SHARE", "length_notes", "resolve_data_config",
           "build_mft_data"]

BAD_RECORD_MODES = ("error", "skip")
MAX_LISTED_PROBLEMS = 20
DEFAULT_MAX_RECORD_BYTES = 8 << 20  # 8 MiB: far above any conversation that fits a context window
LENGTH_WARNING_SHARE = 0.05  # a task losing more of its samples to seq_len than this gets a WARNING


def _problem_lines(path: Path | TableSource, problems: list[tuple[int, str, str]]) -> list[str]:
    where = f"{path}: row {{}}" if isinstance(path, TableSource) else f"{path}:{{}}"
    return [f"{where.format(line)}: {field}: {problem}" for line, field, problem in problems]


def _raise_problems(problems: list[str], context: str) -> None:
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = f"\n... and {more} more" if more > 0 else ""
    raise DataError(
        f"{len(problems)} bad record(s) in {context} (data.on_bad_record: error; set it to skip to drop and count "
        "them):\n" + "\n".join(shown) + tail
    )


def resolve_data_config(tokenizer, *, data_paths, valid_data_paths, template, role_markers, add_bos, seq_len, packing,
                        truncation, task_sampling, temperature, on_bad_record, valid_ratio, valid_size,
                        max_record_bytes=DEFAULT_MAX_RECORD_BYTES, notes: list[str] | None = None,
                        ) -> tuple[ChatFormat, dict[str, list[Path]], dict[str, list[Path]]]:
    """Everything ``build_mft_data`` settles before it reads a record (its arguments of the same names):
    option values, the chat format, that the tokenizer can render it (None: not checked), the task files (what
    their search skipped goes to ``notes``, when given). ``mft validate`` calls it (``recipe_config/checks.py``), so a config is checked exactly as a run builds it.

    Returns:
        (chat format, training tasks, validation tasks) as ``discover_tasks`` maps them.

    Raises:
        DataError: naming the ``data.*`` key.
    """
    _check_options(seq_len, packing, truncation, task_sampling, temperature, on_bad_record, valid_ratio, valid_size)
    if isinstance(max_record_bytes, bool) or not isinstance(max_record_bytes, int) or max_record_bytes < 1:
        raise DataError(f"data.max_record_bytes: expected a positive integer (bytes of one JSONL line), got "
                        f"{max_record_bytes!r}")
    try:
        chat_format = ChatFormat(template=template, role_markers=dict(role_markers or {}), add_bos=add_bos)
        if tokenizer is not None:
            chat_format.check_tokenizer(tokenizer)  # one message, not one per record
    except ValueError as e:
        raise DataError(str(e)) from None
    tasks = discover_tasks(data_paths, notes=notes)
    valid_tasks = discover_tasks(valid_data_paths, "data.valid_data_paths", notes) if valid_data_paths else {}
    unknown = [t for t in valid_tasks if t not in tasks]
    if unknown:
        raise DataError(f"data.valid_data_paths: task(s) {unknown} have no training data; "
                        f"validation tasks must be among {list(tasks)}")
    return chat_format, tasks, valid_tasks


def _check_options(seq_len, packing, truncation, task_sampling, temperature, on_bad_record, valid_ratio, valid_size):
    """Each option by the module that owns it (packing, tokenisation, task sampling), the rest here."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"data.seq_len: expected a positive integer, got {seq_len!r}")
    check_packing(packing)
    check_truncation(truncation)
    if on_bad_record not in BAD_RECORD_MODES:
        raise DataError(f"data.on_bad_record: expected one of {BAD_RECORD_MODES}, got {on_bad_record!r}")
    if isinstance(valid_ratio, bool) or not isinstance(valid_ratio, (int, float)) or not 0 <= valid_ratio < 1:
        raise DataError(f"data.valid_ratio: expected a fraction in [0, 1), got {valid_ratio!r}")
    if valid_size is not None and (not isinstance(valid_size, int) or valid_size < 0):
        raise DataError(f"data.valid_size: expected a non-negative integer (samples per task), got {valid_size!r}")
    check_task_sampling(task_sampling, temperature)


def length_notes(counts: dict[str, dict[str, int]], seq_len: int, truncation: str) -> list[str]:
    """A line per task that loses samples to ``seq_len``: how many were dropped or truncated, of how many read
    (a ``WARNING`` above ``LENGTH_WARNING_SHARE``), and what would keep them whole."""
    lines = []
    for name, c in counts.items():
        cut = c["dropped"] + c["truncated"]
        total = c["kept"] + c["dropped"]  # the samples read well (bad records are reported apart)
        if not cut:
            continue
        what = (f"{c['dropped']} dropped" if c["dropped"] else "") + (", " if c["dropped"] and c["truncated"] else "") \
            + (f"{c['truncated']} truncated (answers cut, no end token)" if c["truncated"] else "")
        share = cut / total if total else 1.0
        head = "WARNING: " if share > LENGTH_WARNING_SHARE else ""
        lines.append(f"{head}task {name}: {what} of {total} samples ({share:.0%}) as longer than data.seq_len="
                     f"{seq_len} tokens (data.truncation: {truncation}); raise data.seq_len to keep them whole")
    return lines


def _check_valid_size(valid_size: int | None, counts: dict[str, dict[str, int]], separate_valid: bool) -> None:
    """A ``valid_size`` a task cannot spare was cut down to keep one training sample, silently: refuse it instead."""
    if valid_size is None or separate_valid:
        return
    # A one-sample task holds nothing out, whatever the size (documented); any other must keep what it is asked for.
    short = {name: c for name, c in counts.items() if c["kept"] >= 2 and valid_size >= c["kept"]}
    if short:
        detail = "; ".join(f"{n}: {c['kept']} samples, {c['valid']} held out, {c['train']} left to train on"
                           for n, c in short.items())
        smallest = min(c["kept"] for c in counts.values() if c["kept"] >= 2)
        raise DataError(f"data.valid_size: {valid_size} samples per task held out for validation leave too little "
                        f"to train on ({detail}); expected fewer than the smallest task's {smallest} samples (or "
                        f"data.valid_ratio, a fraction of each task)")


def build_mft_data(
    tokenizer,
    *,
    data_paths: Sequence[str | dict],
    valid_data_paths: Sequence[str | dict] | None = None,
    valid_ratio: float = 0.05,
    valid_size: int | None = None,
    template: str = "mft",
    role_markers: dict | None = None,
    add_bos: bool = False,
    seq_len: int = 2048,
    packing: str = "pack",
    truncation: str = "drop",
    task_sampling: str = "proportional",
    temperature: float | None = None,
    on_bad_record: str = "error",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    num_workers: int | None = None,
    cache_dir: str | None = None,
    seed: int = 42,
    rank: int = 0,
    world_size: int = 1,
) -> MFTData:
    """Read, validate, tokenise (cached) and split the multi-task data. Runs before any model is built.

    Args:
        tokenizer: a Hugging Face tokenizer (runtime argument from the recipe).
        data_paths: task directories (recursive ``*.jsonl``) or ``.jsonl`` files; task name = dir name / stem; or
            what `datasets` reads: a Parquet file or directory, a ``save_to_disk`` directory, a JSON file, or
            ``{path: ..., columns: {prompt: question, answer: solution}, split: ..., name: ...}`` (``tables.py``).
        valid_data_paths: separate validation tasks (names must match training tasks); disables the split.
        valid_ratio: fraction of each task's samples held out (at least 1 for a task with >= 2 samples).
        valid_size: held-out samples per task instead of ``valid_ratio``.
        template, role_markers, add_bos: the ``ChatFormat`` (``templates.py``).
        seq_len: row length; longer samples follow ``truncation``.
        packing: ``pack`` or ``padding`` (``packing.py``).
        truncation: ``drop`` (default) or ``truncate`` (keep the first ``seq_len`` tokens if a loss token remains).
        task_sampling, temperature: task balancing (``sampling.py``).
        on_bad_record: ``error`` (stop, listing up to 20 problems) or ``skip`` (drop and count per task).
        max_record_bytes: a JSONL line longer than this is a bad record, refused before it is parsed (a huge
            line would cost seconds and gigabytes to parse, only to be dropped as longer than seq_len).
        num_workers: tokenisation processes (default: ``min(8, cpu count)``).
        cache_dir: tokenisation cache (default ``$MFT_CACHE/data`` or ``~/.cache/mft/data``); ``""`` disables it.
        seed: split seed (and the loaders' order).
        rank, world_size: runtime arguments; the split never depends on them.

    Returns:
        MFTData.

    Raises:
        DataError: bad paths, bad records (with ``on_bad_record: error``), bad option values, or a task left
            without samples.
    """
    del rank, world_size  # the split and the cache are rank-independent; loaders take the rank later
    notes: list[str] = []
    chat_format, tasks, valid_tasks = resolve_data_config(
        tokenizer, data_paths=data_paths, valid_data_paths=valid_data_paths, template=template,
        role_markers=role_markers, add_bos=add_bos, seq_len=seq_len, packing=packing, truncation=truncation,
        task_sampling=task_sampling, temperature=temperature, on_bad_record=on_bad_record, valid_ratio=valid_ratio,
        valid_size=valid_size, max_record_bytes=max_record_bytes, notes=notes,
    )
    if cache_dir is None:
        cache_path: Path | None = cache_root() / "data"
    else:
        cache_path = Path(cache_dir).expanduser() if str(cache_dir) else None
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    all_files = [f for files in itertools.chain(tasks.values(), valid_tasks.values()) for f in files]
    results = tokenize_files(all_files, tokenizer, chat_format, seq_len, truncation, cache_path, num_workers,
                             max_record_bytes)

    task_names = list(tasks)
    counts: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    train: list[Sample] = []
    valid: list[Sample] = []
    empty: list[str] = []
    for t, name in enumerate(task_names):
        c = dict.fromkeys(("records", "bad", "kept", "turns", "tokens", "loss_tokens", "dropped", "truncated",
                           "train", "valid"), 0)
        per_split: dict[str, list[Sample]] = {"train": [], "valid": []}
        for split, files in (("train", tasks[name]), ("valid", valid_tasks.get(name, []))):
            for f in files:
                r = results[f]
                problems += _problem_lines(f, r["problems"])
                c["records"] += r["records"]
                c["bad"] += len(r["problems"])
                c["dropped"] += r["dropped"]
                c["truncated"] += r["truncated"]
                c["kept"] += len(r["lengths"])
                c["turns"] += int(r["turns"].sum())
                c["tokens"] += int(r["lengths"].sum())
                c["loss_tokens"] += int(np.count_nonzero(r["mask"]))
                offsets = np.concatenate([[0], np.cumsum(r["lengths"])]).tolist()
                ids, mask = r["ids"], r["mask"]
                per_split[split] += [Sample(ids[a:b], mask[a:b], t) for a, b in zip(offsets[:-1], offsets[1:])]
        task_train = per_split["train"]
        if valid_tasks:
            task_valid = per_split["valid"]
        else:
            held = split_task(len(task_train), name, seed, valid_ratio, valid_size)
            held_set = set(held.tolist())
            task_valid = [task_train[i] for i in held.tolist()]
            task_train = [s for i, s in enumerate(task_train) if i not in held_set]
        c["train"], c["valid"] = len(task_train), len(task_valid)
        if not task_train:
            empty.append(name)
        train += task_train
        valid += task_valid
        counts[name] = c
    if problems and on_bad_record == "error":
        _raise_problems(problems, ", ".join(task_names))
    _check_valid_size(valid_size, counts, bool(valid_tasks))
    notes += length_notes(counts, seq_len, truncation)
    if empty:
        detail = "; ".join(
            f"{n}: {counts[n]['records']} records, {counts[n]['bad']} bad, {counts[n]['dropped']} dropped as longer "
            f"than data.seq_len={seq_len}" for n in empty
        )
        raise DataError(f"task(s) without training samples: {detail}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return MFTData(
        task_names=task_names, chat_format=chat_format, train_samples=train, valid_samples=valid, seq_len=int(seq_len),
        packing=packing, task_sampling=task_sampling, temperature=temperature, seed=int(seed),
        pad_id=int(pad_id if pad_id is not None else 0), eos_token=tokenizer.eos_token, skipped=problems,
        task_files={n: [str(f) for f in files] for n, files in tasks.items()}, counts=counts, notes=notes,
    )
