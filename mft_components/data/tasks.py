"""Tasks: each entry of ``data.data_paths`` is one task, a directory of ``*.jsonl`` files or one ``.jsonl`` file,
or a file `datasets` reads (Parquet, an Arrow ``save_to_disk`` directory, JSON; ``tables.py``).

    data_paths:                 one entry per task
      - data/code_completion    a directory: every *.jsonl below it (recursively, through symbolic links) is one
                                task, named by the dir
      - extra/unit_tests.jsonl  a file: a task named by the file's stem
      - data/sql.parquet        a TableSource (so are a directory of *.parquet, a saved dataset, a .json file,
                                and a mapping {path: ..., columns: {prompt: question, answer: solution}})

A task directory given as a symbolic link is named after the link (as MFTCoder names it), not its target. Hidden
files and directories below a task directory (``.ipynb_checkpoints/``, ``.backup.jsonl``) are skipped, as
MFTCoder's glob skips them, so a migrated data tree does not train duplicates; so are ``*.jsonl`` entries that are
not regular files (FIFOs, devices): both are counted and named in the notes. A file or directory that cannot be
read, or a task path that is a FIFO, device or socket, is one ``DataError`` naming it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Sequence

from mft_components.data.records import DataError
from mft_components.data.tables import TableSource, table_source

__all__ = ["discover_tasks"]


def discover_tasks(paths: Sequence[str | os.PathLike | dict], key: str = "data.data_paths",
                   notes: list[str] | None = None) -> dict[str, list[Path | TableSource]]:
    """Map task names to their JSONL files (or their one ``TableSource``).

    Args:
        paths: task directories (searched recursively for ``*.jsonl``), ``.jsonl`` files, or what `datasets`
            reads (``tables.table_source``).
        key: the config key, for error messages.
        notes: if given, gets a line per task directory where hidden entries or special files were skipped.

    Returns:
        ``{task_name: [files, sorted]}`` in the order of ``paths``.

    Raises:
        DataError: a missing path, a FIFO / device / socket path, a directory without ``*.jsonl``, a directory that cannot be read, a ``*.jsonl``
            symbolic link to nothing, a file that is not ``.jsonl``, or two paths giving the same task name (both
            are named).
    """
    if isinstance(paths, (str, os.PathLike, dict)):
        paths = [paths]
    if paths is None or isinstance(paths, (bool, int, float)):
        raise DataError(f"{key}: expected a list of task directories or .jsonl files, got {paths!r}")
    tasks: dict[str, list[Path | TableSource]] = {}
    origin: dict[str, Path] = {}
    problems = []
    for i, raw in enumerate(paths):
        try:
            table = table_source(raw, f"{key}[{i}]")
        except DataError as e:
            problems.append(str(e))
            continue
        p = table[1].path if table else Path(str(raw)).expanduser()
        if table:
            name, files = table[0], [table[1]]
        elif p.is_dir():
            # Named after the path as written (a link keeps its own name); ".", ".." and "/" by what they are.
            name = Path(os.path.abspath(p)).name or p.resolve().name
            files, unreadable, skipped = _jsonl_files(p)
            problems += [f"{key}[{i}]: {problem}" for problem in unreadable]
            if skipped and notes is not None:
                notes.append(f"{key}[{i}]: {p}: skipped {_describe_skipped(skipped)}")
            if unreadable:
                continue
            if not files:
                problems.append(f"{key}[{i}]: {p}: directory contains no *.jsonl files")
                continue
        elif p.is_file():
            if p.suffix != ".jsonl":
                problems.append(f"{key}[{i}]: {p}: expected a directory, or a .jsonl, .json or .parquet file")
                continue
            name, files = p.stem, [p]
        elif p.exists():
            problems.append(f"{key}[{i}]: {p}: is {_special_kind(p.stat().st_mode)}, not a directory or a .jsonl "
                            "file")
            continue
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


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _describe_skipped(skipped: list[tuple[Path, str]]) -> str:
    """'3 hidden entries (.a.jsonl, .ipynb_checkpoints/, ...) and 1 special file (x.jsonl: a FIFO)'."""
    hidden = [p.name + "/" * (what == "hidden directory") for p, what in skipped if what.startswith("hidden")]
    special = [f"{p}: {what}" for p, what in skipped if not what.startswith("hidden")]
    parts = []
    if hidden:
        shown = ", ".join(hidden[:5]) + (", ..." if len(hidden) > 5 else "")
        parts.append(f"{len(hidden)} hidden file(s) and director(ies) ({shown}), as MFTCoder does")
    if special:
        shown = "; ".join(special[:5]) + ("; ..." if len(special) > 5 else "")
        parts.append(f"{len(special)} *.jsonl that are not regular files ({shown})")
    return " and ".join(parts)


def _jsonl_files(root: Path) -> tuple[list[Path], list[str], list[tuple[Path, str]]]:
    """Every ``*.jsonl`` file below ``root`` (sorted), what could not be searched, and what was skipped.

    Symbolic links are followed, to directories too (a task is often assembled from linked folders). A
    directory reached twice, by a link back to an ancestor (a cycle) or by two links, is searched once, and a
    file reached by two paths is listed once (under its first path in sorted order): no record trains twice.

    Hidden entries (names starting with ``.``) below ``root`` and ``*.jsonl`` entries that are not regular files
    are skipped.

    Returns:
        (files, problems, skipped): problems are directories that cannot be read and ``*.jsonl`` links to nothing;
        skipped are ``(path, what)`` with what ``hidden file``, ``hidden directory`` or the special file's kind.
    """
    files: dict[tuple[int, int], Path] = {}
    problems: list[str] = []
    skipped: list[tuple[Path, str]] = []
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
            if entry.name.startswith("."):
                skipped.append((path, "hidden directory" if entry.is_dir() else "hidden file"))
            elif entry.is_dir():  # follows links
                subdirs.append(path)
            elif entry.name.endswith(".jsonl"):
                if entry.is_file():
                    st = entry.stat()
                    files.setdefault((st.st_dev, st.st_ino), path)
                elif entry.is_symlink() and not path.exists():
                    problems.append(f"{path}: symbolic link to {os.readlink(path)}, which does not exist")
                else:
                    skipped.append((path, _special_kind(path.stat().st_mode)))
        stack += reversed(subdirs)
    return sorted(files.values()), problems, skipped
