"""Tokenisation of the task files, in worker processes, behind a cache keyed by everything that changes the ids.

    files --hash--> cache key (file bytes, tokenizer, chat format, seq_len, truncation)
          --hit---> checksums (size always, SHA-256 once per run) --> memory-map ids/mask arrays (warm start)
          --miss--> byte ranges of lines --worker processes--> parse, validate, render segments,
                    batch-tokenise, truncate --> arrays --> written atomically to the cache   (cold start)

Under torch.distributed the local rank 0 of each node builds the cache while the other ranks wait in step,
then every rank memory-maps it. Too-long conversations follow ``data.truncation`` (``TRUNCATION_MODES``). An entry
records each array's size and SHA-256 (hashed while it is written); one that does not match (edited, truncated,
emptied) is removed with a warning and rebuilt, never trained on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mft_components.data.records import BadRecord, DataError, decode_record, parse_record
from mft_components.data.tables import TableSource, load_table, table_fingerprint, table_records
from mft_components.data.templates import ChatFormat, encode_texts
from mft_components.device import disk_full
from mft_components.distributed import get_rank, get_world_size, is_distributed, run_in_step

__all__ = ["TRUNCATION_MODES", "CACHE_VERSION", "check_truncation", "tokenizer_fingerprint", "tokenize_files"]

TRUNCATION_MODES = ("drop", "truncate")
# 2: empty assistant content and lone surrogates are bad records; 3: text records end "\n<EOS>"; 4: messages /
# conversations records are read (a file of them was cached as all bad records before), checksummed entries,
# max_record_bytes in the key (a v3 entry would read as damaged: a new key skips it quietly)
CACHE_VERSION = 4
# Conversations up to this many bytes in total are tokenised in-process: forking workers costs more than it saves.
_IN_PROCESS_BYTES = 1 << 20
_CHUNK_BYTES = 1 << 20
_CHUNK_ROWS = 4096  # rows of a `datasets` table per unit of work
_ROW_BYTES = 256  # what a row counts as against _IN_PROCESS_BYTES


def check_truncation(truncation: str) -> None:
    """Raise DataError unless ``truncation`` is one of ``TRUNCATION_MODES``."""
    if truncation not in TRUNCATION_MODES:
        raise DataError(f"data.truncation: expected one of {TRUNCATION_MODES}, got {truncation!r}")


@dataclass
class _Job:
    """What a worker needs: the chat format, the tokenizer (inherited by fork or pickled), seq_len, truncation."""

    tokenizer: Any
    chat_format: ChatFormat
    seq_len: int
    truncation: str
    max_record_bytes: int = 8 << 20


_JOB: _Job | None = None
_TABLES: dict[int, tuple[Any, tuple]] = {}  # the tables being tokenised (memory-mapped), inherited by forked workers


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job
    # One tokenizer thread per worker process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _process_range(path: str, start: int, end: int, first_line: int) -> dict:
    """Parse, validate and tokenise the lines in bytes ``[start, end)`` of ``path`` (runs in a worker)."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)

    def numbered_lines():
        for lineno, line in enumerate(raw.split(b"\n"), start=first_line):
            if start == 0 and lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.strip():
                yield lineno, lambda line=line: _decode_bounded(line, _JOB.max_record_bytes)

    return _process_records(numbered_lines(), _JOB)


def _decode_bounded(line: bytes, limit: int) -> Any:
    if len(line) > limit:  # refused unread: parsing it whole could cost gigabytes
        raise BadRecord("record", f"{len(line):,} bytes, over data.max_record_bytes={limit:,}; split it, or raise "
                                  "the bound")
    return decode_record(line)


def _process_rows(table_index: int, start: int, end: int) -> dict:
    """Parse, validate and tokenise rows ``[start, end)`` of a `datasets` table (runs in a worker, which
    inherited the memory-mapped table by fork)."""
    table, columns = _TABLES[table_index]
    records = table_records(table, start, end, columns)
    return _process_records(((row, lambda r=r: r) for row, r in enumerate(records, start=start)), _JOB)


def _process_work(item: tuple) -> dict:
    return _process_rows(*item[1:]) if item[0] == "rows" else _process_range(*item[1:])


def _process_records(numbered, job: _Job) -> dict:
    """``numbered``: ``(line or row, () -> record)``; a record that does not decode is a bad record too."""
    problems: list[tuple[int, str, str]] = []
    seg_lists, lines, turns = [], [], []
    records = 0
    for lineno, read in numbered:
        records += 1
        try:
            kind, value = parse_record(read())
            if kind == "chat":
                segs = job.chat_format.segments(value, job.tokenizer)
                n_turns = sum(m["role"] == "assistant" for m in value)
            else:
                segs = job.chat_format.text_segments(value, job.tokenizer)
                n_turns = 0
        except BadRecord as e:
            problems.append((lineno, e.field, e.problem))
            continue
        except ValueError as e:  # e.g. a template that cannot render this conversation
            problems.append((lineno, "chat_rounds", str(e)))
            continue
        seg_lists.append(segs)
        lines.append(lineno)
        turns.append(n_turns)
    return _tokenise(seg_lists, lines, turns, records, problems, job)


def _tokenise(seg_lists, lines, turns, records, problems, job: _Job) -> dict:
    # One batched tokenizer call for all text pieces of the chunk; the mask is the loss flag repeated per piece.
    texts = [s for segs in seg_lists for s, _ in segs if isinstance(s, str)]
    encoded = iter(encode_texts(job.tokenizer, texts))
    pieces, piece_lens, piece_loss, conv_lens = [], [], [], []
    for segs in seg_lists:
        total = 0
        for seg, loss in segs:
            piece = next(encoded) if isinstance(seg, str) else (seg,)
            pieces.append(piece)
            piece_lens.append(len(piece))
            piece_loss.append(loss)
            total += len(piece)
        conv_lens.append(total)
    ids = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=sum(piece_lens))
    mask = np.repeat(np.asarray(piece_loss, dtype=bool), np.asarray(piece_lens, dtype=np.int64))
    lengths = np.asarray(conv_lens, dtype=np.int64)
    lines_arr = np.asarray(lines, dtype=np.int64)
    turns_arr = np.asarray(turns, dtype=np.int64)
    dropped = truncated = 0
    keep_conv = np.ones(len(lengths), dtype=bool)
    keep_tok = np.ones(len(ids), dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # Too-long samples follow data.truncation; they are rare, so a loop over them only is cheap.
    for i in np.flatnonzero(lengths > job.seq_len).tolist():
        a, b = int(offsets[i]), int(offsets[i + 1])
        if job.truncation == "truncate" and mask[a : a + job.seq_len].any():
            keep_tok[a + job.seq_len : b] = False
            lengths[i] = job.seq_len
            truncated += 1
        else:
            keep_tok[a:b] = False
            keep_conv[i] = False
            dropped += 1
    if not keep_tok.all():
        ids, mask = ids[keep_tok], mask[keep_tok]
    lengths, lines_arr, turns_arr = lengths[keep_conv], lines_arr[keep_conv], turns_arr[keep_conv]
    return {
        "ids": ids, "mask": mask, "lengths": lengths, "lines": lines_arr, "turns": turns_arr,
        "records": records, "dropped": dropped, "truncated": truncated, "problems": problems,
    }


def _line_ranges(data: bytes, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """Cut ``data`` into ``(start, end, first_line)`` byte ranges that end at line boundaries."""
    ranges, start, line = [], 0, 1
    while start < len(data):
        end = data.find(b"\n", min(start + chunk_bytes, len(data)) - 1)
        end = len(data) if end == -1 else end + 1
        ranges.append((start, end, line))
        line += data.count(b"\n", start, end)
        start = end
    return ranges


def _merge(parts: list[dict]) -> dict:
    if not parts:
        parts = [_tokenise([], [], [], 0, [], _Job(None, ChatFormat(), 1, "drop"))]
    return {
        "ids": np.concatenate([p["ids"] for p in parts]).astype(np.int32, copy=False),
        "mask": np.concatenate([p["mask"] for p in parts]).astype(bool, copy=False),
        "lengths": np.concatenate([p["lengths"] for p in parts]).astype(np.int64, copy=False),
        "lines": np.concatenate([p["lines"] for p in parts]).astype(np.int64, copy=False),
        "turns": np.concatenate([p["turns"] for p in parts]).astype(np.int64, copy=False),
        "records": sum(p["records"] for p in parts),
        "dropped": sum(p["dropped"] for p in parts),
        "truncated": sum(p["truncated"] for p in parts),
        "problems": [q for p in parts for q in p["problems"]],
    }


# ---------------------------------------------------------------------------------------------- cache


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes token ids (vocab, merges, normalisation, specials)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("eos_token", "bos_token", "pad_token", "chat_template"):
        h.update(f"|{attr}={getattr(tokenizer, attr, None)}".encode())
    return h.hexdigest()


def _file_key(content_hash: str, tok_fp: str, job: _Job) -> str:
    spec = json.dumps(
        {"v": CACHE_VERSION, "file": content_hash, "tokenizer": tok_fp, "format": job.chat_format.to_dict(),
         "seq_len": job.seq_len, "truncation": job.truncation, "max_record_bytes": job.max_record_bytes},
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()


_ARRAYS = ("ids", "mask", "lengths", "lines", "turns")


class _HashingWriter:
    """A file object that hashes what is written through it: a cache entry's checksum costs no second read."""

    def __init__(self, f):
        self._f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self.size += len(view)
        return self._f.write(view)

    def __getattr__(self, name):  # np.save may ask for fileno, tell, flush, ...
        return getattr(self._f, name)


def _cache_write(entry: Path, result: dict) -> None:
    """Write a cache entry; a full disk leaves it out with a warning (the run goes on with the result in hand)."""
    try:
        _write_entry(entry, result)
    except OSError as e:
        full = disk_full(e, "a tokenisation cache entry", entry.parent.parent,
                         sum(result[name].nbytes for name in _ARRAYS))
        if full is None:
            raise
        print(f"[mft] warning: {full}; going on without caching it (data.cache_dir moves the cache)",
              file=sys.stderr, flush=True)


def _write_entry(entry: Path, result: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}.tmp-", dir=entry.parent))
    try:
        checksums = {}
        for name in _ARRAYS:
            with open(tmp / f"{name}.npy", "wb") as f:
                writer = _HashingWriter(f)
                np.save(writer, result[name])
            checksums[f"{name}.npy"] = {"size": writer.size, "sha256": writer.hash.hexdigest()}
        info = {k: result[k] for k in ("records", "dropped", "truncated")}
        info["problems"] = result["problems"]
        info["files"] = checksums
        (tmp / "info.json").write_text(json.dumps(info))
        try:
            os.rename(tmp, entry)
            _VERIFIED.add(str(entry))  # hashed as written: its first read need not hash it again
        except OSError:
            pass  # another rank or process wrote the same entry first; same content by construction
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Entries whose checksums this process has verified: each is hashed once per run, at its first use.
_VERIFIED: set[str] = set()


def _entry_damage(entry: Path) -> tuple[dict | None, str | None]:
    """(info.json content, None) for an intact entry, or (None, what is wrong). Sizes are checked at every read,
    the SHA-256 of every array at the first read in this process."""
    try:
        info = json.loads((entry / "info.json").read_text())
        files = info["files"]
        for name in _ARRAYS:
            expected = files[f"{name}.npy"]
            size = (entry / f"{name}.npy").stat().st_size
            if size != expected["size"]:
                return None, f"{name}.npy has {size:,} bytes, its checksum record {expected['size']:,}"
        if str(entry) not in _VERIFIED:
            for name in _ARRAYS:
                with open(entry / f"{name}.npy", "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                if digest != files[f"{name}.npy"]["sha256"]:
                    return None, f"{name}.npy does not match its SHA-256 checksum"
            _VERIFIED.add(str(entry))
    except FileNotFoundError as e:
        return None, f"{Path(e.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, empty or garbled info.json
        return None, f"info.json is unreadable or incomplete ({type(e).__name__}: {e})"
    return info, None


def _cache_read(entry: Path) -> dict | None:
    """The cached result, or None: no entry, or a damaged one (removed, with a warning, to be rebuilt)."""
    if not entry.exists():
        return None
    result, damage = _entry_damage(entry)
    if damage is not None:
        print(f"[mft] warning: tokenisation cache entry {entry} is damaged ({damage}); rebuilding it",
              file=sys.stderr, flush=True)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    result["problems"] = [tuple(p) for p in result["problems"]]
    for name in _ARRAYS:
        # ids and mask are memory-mapped: a warm start reads only what training touches. A plain ndarray view
        # of the map slices in C (np.memmap's Python __getitem__ costs ~20 us per sample).
        if name in ("ids", "mask"):
            result[name] = np.load(entry / f"{name}.npy", mmap_mode="r").view(np.ndarray)
        else:
            result[name] = np.load(entry / f"{name}.npy")
    return result


def _read_files(files: list[Path]) -> dict[Path, bytes]:
    """The bytes of every file; a file that cannot be read stops the build, naming it (and every other one)."""
    data, problems = {}, []
    for f in files:
        try:
            data[f] = f.read_bytes()
        except OSError as e:
            problems.append(f"{f}: cannot read the file: {e.strerror or e}")
    if problems:
        raise DataError("\n".join(problems))
    return data


def _build_files(files: list[Path | TableSource], job: _Job, cache_dir: Path | None, num_workers: int
                 ) -> dict[Path | TableSource, dict]:
    """Tokenised result of every file, from the cache when possible, else computed (in parallel) and cached."""
    tok_fp = tokenizer_fingerprint(job.tokenizer) if cache_dir is not None else ""
    results: dict[Path | TableSource, dict] = {}
    todo: list[tuple[Path | TableSource, list[tuple], Path | None]] = []  # (source, units of work, cache entry)

    def entry_of(content_hash: str) -> Path | None:
        if cache_dir is None:
            return None
        key = _file_key(content_hash, tok_fp, job)
        return cache_dir / key[:2] / key

    tables = [f for f in files if isinstance(f, TableSource)]
    weight = 0
    for f, data in _read_files([f for f in files if not isinstance(f, TableSource)]).items():
        entry = entry_of(hashlib.sha256(data).hexdigest())
        cached = _cache_read(entry) if entry is not None else None
        if cached is not None:
            results[f] = cached
            continue
        todo.append((f, [("lines", str(f), a, b, line) for a, b, line in _line_ranges(data, _CHUNK_BYTES)], entry))
        weight += len(data)
    _TABLES.clear()
    for source in tables:
        entry = entry_of("table:" + table_fingerprint(source))
        cached = _cache_read(entry) if entry is not None else None
        if cached is not None:
            results[source] = cached
            continue
        table = load_table(source, cache_dir)
        index = len(_TABLES)
        _TABLES[index] = (table, source.columns)
        rows = len(table)
        todo.append((source, [("rows", index, a, min(a + _CHUNK_ROWS, rows)) for a in range(0, rows, _CHUNK_ROWS)],
                     entry))
        weight += rows * _ROW_BYTES
    work = [item for _, items, _ in todo for item in items]
    if not work:
        for source, _, entry in todo:  # empty files and tables
            results[source] = _finish(_merge([]), entry)
        return results
    methods = multiprocessing.get_all_start_methods()
    try:
        if num_workers <= 1 or weight <= _IN_PROCESS_BYTES or len(work) == 1 or (tables and "fork" not in methods):
            global _JOB
            saved, _JOB = _JOB, job
            try:
                parts = [_process_work(item) for item in work]
            finally:
                _JOB = saved
        else:
            # fork: workers inherit the tokenizer (and the mapped tables) instead of unpickling them.
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ProcessPoolExecutor(min(num_workers, len(work)), mp_context=ctx, initializer=_init_worker,
                                     initargs=(job,)) as pool:
                parts = list(pool.map(_process_work, work))
    finally:
        _TABLES.clear()
    it = iter(parts)
    for source, items, entry in todo:
        results[source] = _finish(_merge([next(it) for _ in items]), entry)
    return results


def _finish(result: dict, entry: Path | None) -> dict:
    """Write a result to the cache and read it back memory-mapped (what a warm start gets)."""
    if entry is None:
        return result
    _cache_write(entry, result)
    cached = _cache_read(entry)
    return cached if cached is not None else result


def _distributed_rank_info() -> tuple[bool, bool]:
    """(is distributed, this process builds the cache): the local rank 0 of each node builds."""
    if not is_distributed() or get_world_size() == 1:
        return False, True
    local_rank = int(os.environ.get("LOCAL_RANK", get_rank()))
    return True, local_rank == 0


def tokenize_files(files: list[Path | TableSource], tokenizer, chat_format: ChatFormat, seq_len: int, truncation: str,
                   cache_dir: Path | None, num_workers: int, max_record_bytes: int = 8 << 20) -> dict[Path, dict]:
    """Every file's records parsed, validated, rendered and tokenised, from the cache when it has them.

    Args:
        files: the task files and `datasets` tables (``tasks.discover_tasks``).
        tokenizer, chat_format: how conversations become token ids and loss masks.
        seq_len, truncation: longer conversations are dropped or cut (``data.truncation``).
        cache_dir: the tokenisation cache (None: none).
        num_workers: tokenisation processes.
        max_record_bytes: a longer line is a bad record (``record`` field), refused before it is parsed.

    Returns:
        Per file: ``ids``, ``mask`` (concatenated), ``lengths``, ``lines``, ``turns`` of the kept conversations,
        and ``records``, ``dropped``, ``truncated``, ``problems`` (``(line, field, problem)`` of bad records; a
        table's row numbers in place of lines).

    Raises:
        DataError: a file cannot be read.
    """
    job = _Job(tokenizer, chat_format, int(seq_len), truncation, int(max_record_bytes))
    distributed, builder = _distributed_rank_info()
    distributed = distributed and cache_dir is not None  # without a cache every rank tokenises for itself
    if distributed:
        # The other ranks wait in step (a short all-reduce each second) rather than in one barrier: a cache build
        # longer than distributed_timeout_s is not a stopped rank.
        error: BaseException | None = None

        def build() -> None:
            nonlocal error
            if builder:
                try:
                    _build_files(files, job, cache_dir, num_workers)
                except BaseException as e:  # keep meeting the others, or they would wait for the timeout
                    error = e

        run_in_step(build)
        if error is not None:
            raise error
    return _build_files(files, job, cache_dir, num_workers if not distributed else 1)
