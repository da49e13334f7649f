"""The MFT dataset: task directories of JSONL -> validated conversations -> tokenised samples, split per task.

Input (config node ``data:``, built by ``build_mft_data``)::

    data_paths:                 one entry per task
      - data/code_completion    a directory: every *.jsonl below it (recursively, through symbolic links) is one
                                task, named by the dir
      - extra/unit_tests.jsonl  a file: a task named by the file's stem

One JSON object per line; blank lines, CRLF line ends and a UTF-8 BOM are fine. Accepted record shapes:

* ``{"chat_rounds": [{"role": ..., "content": ...}, ...]}`` with roles ``system`` (first only), ``human``/``user``
  and ``bot``/``assistant``/``gpt``, user and assistant alternating, at least one assistant turn;
* single turn (MFTCoder's shapes): ``prompt``/``answer``, ``prompt``/``response``, ``instruction``/``output`` (an
  Alpaca ``input`` is appended to the instruction), ``instruction``/``response``, ``question``/``response``,
  ``question``/``answer``, ``query``/``answer``, ``input``/``output``, each with an optional ``system`` (an empty
  one adds no system turn); a prompt key without its answer key is a bad record (nothing to learn);
* ``{"text": ...}``: plain text, every token carries loss.

Other keys (``id``, ``data_name``, ...) are ignored. Assistant content must not be empty (nothing to learn);
system and user content may be. A bad record, including a line that is not JSON, nests deeper than the JSON
decoder reads, or holds a lone surrogate, is reported as ``path:line: field: problem``; ``on_bad_record: error``
stops with up to 20 of them listed, ``skip`` drops them and counts them per task. A file or directory that cannot
be read, and a tokenizer without EOS, are one ``DataError`` naming it, whatever ``on_bad_record`` says.

Pipeline and cache::

    files --hash--> cache key (file bytes, tokenizer, chat format, seq_len, truncation)
          --hit---> memory-map ids/mask arrays                                              (warm start)
          --miss--> byte ranges of lines --worker processes--> parse, validate, render segments,
                    batch-tokenise, truncate --> arrays --> written atomically to the cache   (cold start)
    samples --per task split (seed)--> train_samples / valid_samples --sampling.py--> loaders

Under torch.distributed the local rank 0 of each node builds the cache while the other ranks wait in step,
then every rank memory-maps it.
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
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mft_components.templates import ChatFormat, encode_texts

__all__ = [
    "DataError",
    "Sample",
    "MFTData",
    "build_mft_data",
    "discover_tasks",
    "parse_record",
    "resolve_data_config",
    "tokenizer_fingerprint",
]

TRUNCATION_MODES = ("drop", "truncate")
BAD_RECORD_MODES = ("error", "skip")
MAX_LISTED_PROBLEMS = 20
CACHE_VERSION = 2  # 2: empty assistant content and lone surrogates are bad records
# Conversations up to this many bytes in total are tokenised in-process: forking workers costs more than it saves.
_IN_PROCESS_BYTES = 1 << 20
_CHUNK_BYTES = 1 << 20

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("bot", "assistant", "gpt")
SINGLE_TURN_SHAPES = (  # (prompt key, answer key), tried in this order; MFTCoder's shapes, Alpaca's first
    ("prompt", "answer"),
    ("prompt", "response"),
    ("instruction", "output"),
    ("instruction", "response"),
    ("question", "response"),
    ("question", "answer"),
    ("query", "answer"),
    ("input", "output"),
)


class DataError(ValueError):
    """Bad training data, worded for the person who owns it: ``path:line: field: problem`` lines."""


@dataclass
class Sample:
    """One tokenised conversation.

    Args:
        input_ids: int32 token ids (``len <= seq_len``).
        loss_mask: bool, True where the token is a training target (assistant content and its EOS).
        task_id: index into ``MFTData.task_names``.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    task_id: int


# ---------------------------------------------------------------------------------------------- records


class _Bad(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


class _LongInteger:
    """A JSON integer with more digits than Python converts (``sys.get_int_max_str_digits()``, 4300).

    Such a number is valid JSON: in a key mft ignores (``id``) the record is fine; anywhere mft reads it is
    reported by that field's type check instead of failing the whole line."""

    __slots__ = ("digits",)

    def __init__(self, digits: str) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<{len(self.digits.lstrip('-'))}-digit integer>"


def _parse_int(digits: str) -> int | _LongInteger:
    try:
        return int(digits)
    except ValueError:
        return _LongInteger(digits)


# One decoder for every line (json.loads with options would build one per call).
_JSON = json.JSONDecoder(parse_int=_parse_int)


def _kind(value: Any) -> str:
    """The type of a JSON value, for messages."""
    return "int" if isinstance(value, _LongInteger) else type(value).__name__


def _check_text(value: Any, where: str) -> str:
    """``value`` if it is a string the tokenizer can take, else ``_Bad``: not a string, or a lone surrogate
    (JSON allows ``"\\ud800"`` unpaired; it is not Unicode text, and tokenizers reject it)."""
    if not isinstance(value, str):
        raise _Bad(where, f"expected a string, got {_kind(value)}")
    if not value.isascii():  # O(1) for ASCII strings; only other text pays for the encode
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _Bad(where, f"lone surrogate {value[e.start]!r} at character {e.start}: not valid Unicode text "
                              "(a \\ud800-\\udfff escape must be half of a high/low pair)") from None
    return value


def _string(record: dict, key: str, where: str | None = None) -> str:
    return _check_text(record[key], where or key)


def _check_answer(content: str, where: str) -> None:
    """Empty assistant content teaches only "stop at once": almost always a data bug, so it is a bad record.
    (Empty system or user content is fine: the assistant turn after it still has something to learn.)"""
    if not content.strip():
        raise _Bad(where, "empty assistant content (nothing to learn); give the answer or drop the record")


def parse_record(record: Any) -> tuple[str, Any]:
    """Validate one JSON record and normalise it.

    Args:
        record: the decoded JSON value of one line.

    Returns:
        ``("chat", messages)`` with roles ``system``/``user``/``assistant``, or ``("text", text)``.

    Raises:
        _Bad: with the offending field and what is wrong (``DataError`` lines are made from it).
    """
    if not isinstance(record, dict):
        raise _Bad("record", f"expected a JSON object, got {_kind(record)}")
    if "chat_rounds" in record:
        return "chat", _parse_chat_rounds(record["chat_rounds"])
    for prompt_key, answer_key in SINGLE_TURN_SHAPES:
        if prompt_key in record and answer_key in record:
            prompt = _string(record, prompt_key)
            if prompt_key == "instruction" and "input" in record:
                extra = _string(record, "input")
                if extra.strip():
                    prompt = f"{prompt}\n\n{extra}"
            messages = []
            # An empty system is no system turn, as in MFTCoder's tokenisation.
            if record.get("system") is not None and _string(record, "system"):
                messages.append({"role": "system", "content": record["system"]})
            messages.append({"role": "user", "content": prompt})
            answer = _string(record, answer_key)
            _check_answer(answer, answer_key)
            messages.append({"role": "assistant", "content": answer})
            return "chat", messages
    if "text" in record:
        text = _string(record, "text")
        if not text:
            raise _Bad("text", "is empty")
        return "text", text
    shapes = ", ".join(f"{p}/{a}" for p, a in SINGLE_TURN_SHAPES)
    prompts = [k for k in dict.fromkeys(p for p, _ in SINGLE_TURN_SHAPES) if k in record]
    if prompts:  # a prompt without an answer: nothing to learn
        answers = "/".join(a for p, a in SINGLE_TURN_SHAPES if p == prompts[0])
        raise _Bad("record", f"no known shape: {prompts[0]!r} has no {answers} to learn (keys: {sorted(record)[:8]})")
    raise _Bad("record", f"no known shape; expected chat_rounds, {shapes} or text (keys: {sorted(record)[:8]})")


def _parse_chat_rounds(rounds: Any, prompt_only: bool = False) -> list[dict]:
    if not isinstance(rounds, list):
        raise _Bad("chat_rounds", f"expected a list of turns, got {_kind(rounds)}")
    if not rounds:
        raise _Bad("chat_rounds", "is empty")
    messages = []
    for i, turn in enumerate(rounds):
        where = f"chat_rounds[{i}]"
        if not isinstance(turn, dict):
            raise _Bad(where, f"expected an object with role and content, got {_kind(turn)}")
        if "role" not in turn:
            raise _Bad(f"{where}.role", "missing")
        role = turn["role"]
        role_key = role.lower() if isinstance(role, str) else role
        if role_key == "system":
            if i != 0:
                raise _Bad(f"{where}.role", "'system' is only allowed as the first turn")
            norm = "system"
        elif role_key in USER_ROLES:
            norm = "user"
        elif role_key in ASSISTANT_ROLES:
            norm = "assistant"
        else:
            raise _Bad(f"{where}.role", f"unknown role {role!r}; expected system, human/user or bot/assistant/gpt")
        if "content" not in turn:
            raise _Bad(f"{where}.content", "missing")
        content = _check_text(turn["content"], f"{where}.content")
        if norm == "assistant":
            _check_answer(content, f"{where}.content")
        if norm != "system":
            prev = messages[-1]["role"] if messages and messages[-1]["role"] != "system" else None
            expected = "assistant" if prev == "user" else "user"
            if norm != expected:
                raise _Bad(f"{where}.role", f"{role!r} follows {'the start' if prev is None else repr(prev)}; "
                                            f"user and assistant turns must alternate, starting with user")
        messages.append({"role": norm, "content": content})
    if prompt_only:
        if messages[-1]["role"] != "user":
            raise _Bad("chat_rounds", "must end with a user turn (the model answers it)")
    elif not any(m["role"] == "assistant" for m in messages):
        raise _Bad("chat_rounds", "has no assistant turn (nothing to learn)")
    return messages


def parse_prompt_rounds(rounds: Any) -> list[dict]:
    """A prompt given as ``chat_rounds`` (an evaluation problem): the training roles, ending with a user turn.

    Raises:
        ValueError: ``field: problem`` (e.g. ``chat_rounds[1].role: unknown role 'x' ...``).
    """
    try:
        return _parse_chat_rounds(rounds, prompt_only=True)
    except _Bad as e:
        raise ValueError(str(e)) from None


# -------------------------------------------------------------------------------------- tokenisation


@dataclass
class _Job:
    """What a worker needs: the chat format, the tokenizer (inherited by fork or pickled), seq_len, truncation."""

    tokenizer: Any
    chat_format: ChatFormat
    seq_len: int
    truncation: str


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job
    # One tokenizer thread per worker process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _process_range(path: str, start: int, end: int, first_line: int) -> dict:
    """Parse, validate and tokenise the lines in bytes ``[start, end)`` of ``path`` (runs in a worker)."""
    job = _JOB
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    problems: list[tuple[int, str, str]] = []
    seg_lists, lines, turns = [], [], []
    records = 0
    for lineno, line in enumerate(raw.split(b"\n"), start=first_line):
        if start == 0 and lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        records += 1
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Bad("line", f"invalid UTF-8 at byte {e.start}") from None
            try:
                record = _JSON.decode(text)
            except json.JSONDecodeError as e:
                raise _Bad("json", _json_problem(e)) from None
            except RecursionError:  # the C decoder recurses once per nesting level
                raise _Bad("json", f"nested too deeply (Python's JSON decoder stops at about "
                                   f"{sys.getrecursionlimit()} levels of arrays/objects)") from None
            kind, value = parse_record(record)
            if kind == "chat":
                segs = job.chat_format.segments(value, job.tokenizer)
                n_turns = sum(m["role"] == "assistant" for m in value)
            else:
                segs = job.chat_format.text_segments(value, job.tokenizer)
                n_turns = 0
        except _Bad as e:
            problems.append((lineno, e.field, e.problem))
            continue
        except ValueError as e:  # e.g. a template that cannot render this conversation
            problems.append((lineno, "chat_rounds", str(e)))
            continue
        seg_lists.append(segs)
        lines.append(lineno)
        turns.append(n_turns)
    return _tokenise(seg_lists, lines, turns, records, problems, job)


def _json_problem(e: json.JSONDecodeError) -> str:
    msg = e.msg.removesuffix(" at")  # some of json's messages end in "at", meant to be followed by a position
    if msg.startswith("Invalid control character"):
        msg += f" {e.doc[e.pos]!r}"
        hint = " (control characters such as NUL must be escaped inside strings: \\u0000)"
    else:
        hint = ""
    return f"invalid JSON: {msg} at column {e.colno}{hint}"


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


def _file_key(content_hash: str, tok_fp: str, chat_format: ChatFormat, seq_len: int, truncation: str) -> str:
    spec = json.dumps(
        {"v": CACHE_VERSION, "file": content_hash, "tokenizer": tok_fp, "format": chat_format.to_dict(),
         "seq_len": seq_len, "truncation": truncation},
        sort_keys=True,
    )
    return hashlib.sha256(spec.encode()).hexdigest()


_ARRAYS = ("ids", "mask", "lengths", "lines", "turns")


def _cache_write(entry: Path, result: dict) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{entry.name}.tmp-", dir=entry.parent))
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", result[name])
        info = {k: result[k] for k in ("records", "dropped", "truncated")}
        info["problems"] = result["problems"]
        (tmp / "info.json").write_text(json.dumps(info))
        try:
            os.rename(tmp, entry)
        except OSError:
            pass  # another rank or process wrote the same entry first; same content by construction
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_read(entry: Path) -> dict | None:
    if not (entry / "info.json").exists():
        return None
    result = json.loads((entry / "info.json").read_text())
    result["problems"] = [tuple(p) for p in result["problems"]]
    for name in _ARRAYS:
        # ids and mask are memory-mapped: a warm start reads only what training touches. A plain ndarray view
        # of the map slices in C (np.memmap's Python __getitem__ costs ~20 us per sample).
        if name in ("ids", "mask"):
            result[name] = np.load(entry / f"{name}.npy", mmap_mode="r").view(np.ndarray)
        else:
            result[name] = np.load(entry / f"{name}.npy")
    return result


# ---------------------------------------------------------------------------------------------- tasks


def discover_tasks(paths: Sequence[str | os.PathLike], key: str = "data.data_paths") -> dict[str, list[Path]]:
    """Map task names to their JSONL files.

    Args:
        paths: task directories (searched recursively for ``*.jsonl``) or ``.jsonl`` files.
        key: the config key, for error messages.

    Returns:
        ``{task_name: [files, sorted]}`` in the order of ``paths``.

    Raises:
        DataError: a missing path, a directory without ``*.jsonl``, a directory that cannot be read, a ``*.jsonl``
            symbolic link to nothing, a file that is not ``.jsonl``, or two paths giving the same task name (both
            are named).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    tasks: dict[str, list[Path]] = {}
    origin: dict[str, Path] = {}
    problems = []
    for i, raw in enumerate(paths):
        p = Path(str(raw)).expanduser()
        if p.is_dir():
            name, (files, unreadable) = p.resolve().name, _jsonl_files(p)
            problems += [f"{key}[{i}]: {problem}" for problem in unreadable]
            if unreadable:
                continue
            if not files:
                problems.append(f"{key}[{i}]: {p}: directory contains no *.jsonl files")
                continue
        elif p.is_file():
            if p.suffix != ".jsonl":
                problems.append(f"{key}[{i}]: {p}: expected a directory or a .jsonl file")
                continue
            name, files = p.stem, [p]
        else:
            problems.append(f"{key}[{i}]: {p}: no such file or directory")
            continue
        if name in tasks:
            problems.append(f"{key}[{i}]: task name {name!r} of {p} is also the name of {origin[name]}; "
                            "rename one directory or file")
            continue
        tasks[name], origin[name] = files, p
    if problems:
        raise DataError("\n".join(problems))
    if not tasks:
        raise DataError(f"{key}: no tasks given; expected a list of task directories or .jsonl files")
    return tasks


def _jsonl_files(root: Path) -> tuple[list[Path], list[str]]:
    """Every ``*.jsonl`` file below ``root`` (sorted), and what could not be searched.

    Symbolic links are followed, to directories too (a task is often assembled from linked folders). A
    directory reached twice, by a link back to an ancestor (a cycle) or by two links, is searched once, and a
    file reached by two paths is listed once (under its first path in sorted order): no record trains twice.

    Returns:
        (files, problems): problems are directories that cannot be read and ``*.jsonl`` links to nothing.
    """
    files: dict[tuple[int, int], Path] = {}
    problems: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:  # depth first, in sorted order: which path of a twice-reached file is kept never varies
        directory = stack.pop()
        try:
            st = directory.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append(f"{directory}: cannot read the directory: {e.strerror or e}")
            continue
        subdirs = []
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir():  # follows links
                subdirs.append(path)
            elif entry.name.endswith(".jsonl"):
                if entry.is_file():
                    st = entry.stat()
                    files.setdefault((st.st_dev, st.st_ino), path)
                elif entry.is_symlink() and not path.exists():
                    problems.append(f"{path}: symbolic link to {os.readlink(path)}, which does not exist")
        stack += reversed(subdirs)
    return sorted(files.values()), problems


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


def _build_files(files: list[Path], job: _Job, cache_dir: Path | None, num_workers: int) -> dict[Path, dict]:
    """Tokenised result of every file, from the cache when possible, else computed (in parallel) and cached."""
    tok_fp = tokenizer_fingerprint(job.tokenizer) if cache_dir is not None else ""
    results: dict[Path, dict] = {}
    todo: list[tuple[Path, bytes, Path | None]] = []
    for f, data in _read_files(files).items():
        entry = None
        if cache_dir is not None:
            key = _file_key(hashlib.sha256(data).hexdigest(), tok_fp, job.chat_format, job.seq_len, job.truncation)
            entry = cache_dir / key[:2] / key
            cached = _cache_read(entry)
            if cached is not None:
                results[f] = cached
                continue
        todo.append((f, data, entry))
    if not todo:
        return results
    tasks = [(str(f), a, b, line) for f, data, _ in todo for a, b, line in _line_ranges(data, _CHUNK_BYTES)]
    total = sum(len(data) for _, data, _ in todo)
    if num_workers <= 1 or total <= _IN_PROCESS_BYTES or len(tasks) == 1:
        global _JOB
        saved, _JOB = _JOB, job
        try:
            parts = [_process_range(*t) for t in tasks]
        finally:
            _JOB = saved
    else:
        from concurrent.futures import ProcessPoolExecutor

        # fork: workers inherit the tokenizer instead of unpickling it (and re-importing transformers).
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(job,)) as pool:
            parts = list(pool.map(_process_range, *zip(*tasks)))
    it = iter(parts)
    for f, data, entry in todo:
        n = len(_line_ranges(data, _CHUNK_BYTES))
        result = _merge([next(it) for _ in range(n)])
        if entry is not None:
            _cache_write(entry, result)
            cached = _cache_read(entry)
            result = cached if cached is not None else result
        results[f] = result
    return results


# ---------------------------------------------------------------------------------------------- dataset


STAT_KEYS = ("records", "bad", "kept", "turns", "tokens", "loss_tokens", "dropped", "truncated",
             "train", "valid", "rows", "packing_efficiency")


@dataclass
class MFTData:
    """The tokenised multi-task dataset, split into train and validation samples.

    Attributes:
        task_names: task names; ``Sample.task_id`` indexes this list.
        chat_format: the ``ChatFormat`` the samples were rendered with (saved in checkpoints).
        train_samples, valid_samples: lists of ``Sample``.
        seq_len, packing, task_sampling, temperature, seed, pad_id: what the loaders need.
        skipped: ``path:line: field: problem`` of the records skipped with ``on_bad_record: skip``.
        task_files: the files of each task.
    """

    task_names: list[str]
    chat_format: ChatFormat
    train_samples: list[Sample]
    valid_samples: list[Sample]
    seq_len: int
    packing: str = "pack"
    task_sampling: str = "proportional"
    temperature: float | None = None
    seed: int = 42
    pad_id: int = 0
    eos_token: str | None = None
    skipped: list[str] = field(default_factory=list)
    task_files: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    _stats: dict[str, dict] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------------------------------
    def train_loader(self, micro_batch_size: int, gradient_accumulation_steps: int = 1, rank: int = 0,
                     world_size: int = 1, num_workers: int = 0, pin_memory: bool = False):
        """This rank's training loader (``sampling.build_train_loader``): a torchdata ``StatefulDataLoader``
        (``pin_memory`` for asynchronous copies to a GPU).

        Call ``loader.sampler.set_epoch(e)`` before each epoch; ``state_dict()``/``load_state_dict()`` resume
        mid-epoch exactly.
        """
        from mft_components.sampling import build_train_loader

        return build_train_loader(
            self.train_samples, self.task_names, seq_len=self.seq_len, packing=self.packing,
            task_sampling=self.task_sampling, temperature=self.temperature, micro_batch_size=micro_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps, rank=rank, world_size=world_size,
            seed=self.seed, pad_id=self.pad_id, num_workers=num_workers, pin_memory=pin_memory,
        )

    def valid_loader(self, micro_batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                     pin_memory: bool = False):
        """This rank's validation loader (``sampling.build_valid_loader``): each valid row on one rank."""
        from mft_components.sampling import build_valid_loader

        return build_valid_loader(
            self.valid_samples, seq_len=self.seq_len, packing=self.packing, micro_batch_size=micro_batch_size,
            rank=rank, world_size=world_size, pad_id=self.pad_id, num_workers=num_workers, pin_memory=pin_memory,
        )

    # ------------------------------------------------------------------------------------------------------------
    @property
    def task_sample_counts(self) -> dict[str, int]:
        """Training samples per task."""
        counts = np.bincount([s.task_id for s in self.train_samples], minlength=len(self.task_names))
        return {t: int(c) for t, c in zip(self.task_names, counts)}

    @property
    def stats(self) -> dict[str, dict]:
        """Per task: records, bad, kept, turns, tokens, loss_tokens, dropped, truncated, train, valid, rows
        (packed rows of the task's training samples alone) and packing_efficiency. ``total_stats`` sums them."""
        if self._stats is None:
            from mft_components.packing import pack_lengths, packing_efficiency

            stats = {}
            for t, name in enumerate(self.task_names):
                s = dict(self.counts[name])
                lengths = np.array([len(x.input_ids) for x in self.train_samples if x.task_id == t], dtype=np.int64)
                rows = pack_lengths(lengths, self.seq_len, self.packing) if len(lengths) else []
                s["rows"] = len(rows)
                s["packing_efficiency"] = packing_efficiency(rows, lengths, self.seq_len) if rows else 0.0
                stats[name] = s
            self._stats = stats
        return self._stats

    @property
    def total_stats(self) -> dict:
        """``stats`` summed over the tasks (packing_efficiency weighted by rows)."""
        stats = self.stats
        total = {k: sum(s[k] for s in stats.values()) for k in STAT_KEYS if k != "packing_efficiency"}
        real = sum(s["packing_efficiency"] * s["rows"] for s in stats.values())
        total["packing_efficiency"] = real / total["rows"] if total["rows"] else 0.0
        return total

    def format_stats(self) -> str:
        """The per-task statistics as a fixed-width table."""
        headers = ("task", "records", "bad", "kept", "turns", "tokens", "loss_tok", "dropped", "trunc",
                   "train", "valid", "rows", "pack_eff")
        keys = ("records", "bad", "kept", "turns", "tokens", "loss_tokens", "dropped", "truncated",
                "train", "valid", "rows")
        table = [headers]
        for name, s in [*self.stats.items(), ("total", self.total_stats)]:
            table.append((name, *(f"{s[k]:,}" for k in keys), f"{100 * s['packing_efficiency']:.1f}%"))
        widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
        lines = []
        for j, row in enumerate(table):
            if j == len(table) - 1:
                lines.append("  ".join("-" * w for w in widths))
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        return "\n".join(lines)


def _problem_lines(path: Path, problems: list[tuple[int, str, str]]) -> list[str]:
    return [f"{path}:{line}: {field}: {problem}" for line, field, problem in problems]


def _raise_problems(problems: list[str], context: str) -> None:
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = f"\n... and {more} more" if more > 0 else ""
    raise DataError(
        f"{len(problems)} bad record(s) in {context} (data.on_bad_record: error; set it to skip to drop and count "
        "them):\n" + "\n".join(shown) + tail
    )


def _split_task(n: int, name: str, seed: int, valid_ratio: float, valid_size: int | None) -> np.ndarray:
    """Indices (of a task's n samples) that go to validation: deterministic in (seed, task name), rank-free."""
    if valid_size is not None:
        k = int(valid_size)
    else:
        k = int(round(n * float(valid_ratio)))
        if valid_ratio > 0:
            k = max(k, 1)
    k = min(k, n - 1) if n >= 2 else 0  # keep at least one training sample
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    return np.sort(rng.permutation(n)[:k])


def resolve_data_config(tokenizer, *, data_paths, valid_data_paths, template, role_markers, add_bos, seq_len, packing,
                        truncation, task_sampling, temperature, on_bad_record, valid_ratio, valid_size,
                        ) -> tuple[ChatFormat, dict[str, list[Path]], dict[str, list[Path]]]:
    """Everything ``build_mft_data`` settles before it reads a record (its arguments of the same names):
    option values, the chat format, that the tokenizer can render it (None: not checked), the task files.
    ``mft validate`` calls it (``recipe_checks.py``), so a config is checked exactly as a run builds it.

    Returns:
        (chat format, training tasks, validation tasks) as ``discover_tasks`` maps them.

    Raises:
        DataError: naming the ``data.*`` key.
    """
    _check_options(seq_len, packing, truncation, task_sampling, temperature, on_bad_record, valid_ratio, valid_size)
    try:
        chat_format = ChatFormat(template=template, role_markers=dict(role_markers or {}), add_bos=add_bos)
        if tokenizer is not None:
            chat_format.check_tokenizer(tokenizer)  # one message, not one per record
    except ValueError as e:
        raise DataError(str(e)) from None
    tasks = discover_tasks(data_paths)
    valid_tasks = discover_tasks(valid_data_paths, "data.valid_data_paths") if valid_data_paths else {}
    unknown = [t for t in valid_tasks if t not in tasks]
    if unknown:
        raise DataError(f"data.valid_data_paths: task(s) {unknown} have no training data; "
                        f"validation tasks must be among {list(tasks)}")
    return chat_format, tasks, valid_tasks


def _check_options(seq_len, packing, truncation, task_sampling, temperature, on_bad_record, valid_ratio, valid_size):
    from mft_components.packing import PACKING_MODES
    from mft_components.sampling import task_probabilities

    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"data.seq_len: expected a positive integer, got {seq_len!r}")
    if packing not in PACKING_MODES:
        raise DataError(f"data.packing: expected one of {PACKING_MODES}, got {packing!r}")
    if truncation not in TRUNCATION_MODES:
        raise DataError(f"data.truncation: expected one of {TRUNCATION_MODES}, got {truncation!r}")
    if on_bad_record not in BAD_RECORD_MODES:
        raise DataError(f"data.on_bad_record: expected one of {BAD_RECORD_MODES}, got {on_bad_record!r}")
    if isinstance(valid_ratio, bool) or not isinstance(valid_ratio, (int, float)) or not 0 <= valid_ratio < 1:
        raise DataError(f"data.valid_ratio: expected a fraction in [0, 1), got {valid_ratio!r}")
    if valid_size is not None and (not isinstance(valid_size, int) or valid_size < 0):
        raise DataError(f"data.valid_size: expected a non-negative integer (samples per task), got {valid_size!r}")
    try:
        task_probabilities([1], task_sampling, temperature)
    except ValueError as e:
        raise DataError(str(e)) from None


def _distributed_rank_info() -> tuple[bool, bool]:
    """(is distributed, this process builds the cache): the local rank 0 of each node builds."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False, True
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False, True
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return True, local_rank == 0


def build_mft_data(
    tokenizer,
    *,
    data_paths: Sequence[str],
    valid_data_paths: Sequence[str] | None = None,
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
    num_workers: int | None = None,
    cache_dir: str | None = None,
    seed: int = 42,
    rank: int = 0,
    world_size: int = 1,
) -> MFTData:
    """Read, validate, tokenise (cached) and split the multi-task data. Runs before any model is built.

    Args:
        tokenizer: a Hugging Face tokenizer (runtime argument from the recipe).
        data_paths: task directories (recursive ``*.jsonl``) or ``.jsonl`` files; task name = dir name / stem.
        valid_data_paths: separate validation tasks (names must match training tasks); disables the split.
        valid_ratio: fraction of each task's samples held out (at least 1 for a task with >= 2 samples).
        valid_size: held-out samples per task instead of ``valid_ratio``.
        template, role_markers, add_bos: the ``ChatFormat`` (``templates.py``).
        seq_len: row length; longer samples follow ``truncation``.
        packing: ``pack`` or ``padding`` (``packing.py``).
        truncation: ``drop`` (default) or ``truncate`` (keep the first ``seq_len`` tokens if a loss token remains).
        task_sampling, temperature: task balancing (``sampling.py``).
        on_bad_record: ``error`` (stop, listing up to 20 problems) or ``skip`` (drop and count per task).
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
    chat_format, tasks, valid_tasks = resolve_data_config(
        tokenizer, data_paths=data_paths, valid_data_paths=valid_data_paths, template=template,
        role_markers=role_markers, add_bos=add_bos, seq_len=seq_len, packing=packing, truncation=truncation,
        task_sampling=task_sampling, temperature=temperature, on_bad_record=on_bad_record, valid_ratio=valid_ratio,
        valid_size=valid_size,
    )
    if cache_dir is None:
        from mft_components.assets.cache import cache_root

        cache_path: Path | None = cache_root() / "data"
    else:
        cache_path = Path(cache_dir).expanduser() if str(cache_dir) else None
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    job = _Job(tokenizer, chat_format, int(seq_len), truncation)
    all_files = [f for files in itertools.chain(tasks.values(), valid_tasks.values()) for f in files]

    distributed, builder = _distributed_rank_info()
    distributed = distributed and cache_path is not None  # without a cache every rank tokenises for itself
    if distributed:
        # Only under torchrun, where torch.distributed is loaded anyway. The other ranks wait in step (a short
        # all-reduce each second) rather than in one barrier: a cache build longer than distributed_timeout_s is
        # not a stopped rank.
        from mft_components.distributed import run_in_step

        error: BaseException | None = None

        def build() -> None:
            nonlocal error
            if builder:
                try:
                    _build_files(all_files, job, cache_path, num_workers)
                except BaseException as e:  # keep meeting the others, or they would wait for the timeout
                    error = e

        run_in_step(build)
        if error is not None:
            raise error
    results = _build_files(all_files, job, cache_path, num_workers if not distributed else 1)

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
            held = _split_task(len(task_train), name, seed, valid_ratio, valid_size)
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
        task_files={n: [str(f) for f in files] for n, files in tasks.items()}, counts=counts,
    )
