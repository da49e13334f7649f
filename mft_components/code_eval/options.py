"""The ``eval.code`` config section: ``CodeEvalOptions`` (its keys, defaults and value checks) and its error.

``mft validate`` checks a config's section with ``CodeEvalOptions.value_problems`` (through
``recipe_config/checks.py``); a run and ``mft eval`` build the options with ``from_config``, which refuses the same
values. Eval files named in ``tasks`` are read, so their bad records are listed as ``path:line: field: ...``.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from typing import Literal

from mft_components.assets.dataframebench import DATAFRAMEBENCH_TASKS
from mft_components.code_eval.isolation import namespaces_problem

__all__ = ["CodeEvalError", "CodeEvalOptions"]


class CodeEvalError(ValueError):
    """Bad ``eval.code`` settings, eval set or eval interpreter: ``eval.code.KEY: problem`` / ``path:line: ...``."""


@dataclass
class CodeEvalOptions:
    """The config section ``eval.code`` (checked by ``mft validate``; see README *Code evaluation*).

    Attributes:
        tasks: task name -> eval set: a JSONL file, ``humaneval`` or ``dataframebench:TASK``.
        num_samples: sampled answers per problem for pass@k (0: greedy pass@1 only).
        k: the k of pass@k reported from the samples (each 2..num_samples; default [num_samples]).
        temperature, top_p: sampling settings of those answers.
        max_new_tokens: answer budget.
        batch_size: prompts decoded together.
        cpu_threads: torch's intra-op threads while generating on a CPU (null: torch's setting; 1 by default:
            small-batch decoding gains little from threads and loses much when the cores are shared).
        every_n_steps: evaluate every N steps (null: whenever the validation loss is evaluated); always before
            training and at the end.
        max_problems: the first N problems of each task (null: all).
        timeout_s: seconds per program (null: each suite's default, ``suites.SUITE_TIMEOUTS_S``: humaneval 10,
            dataframebench 60, eval files 10).
        memory_mb, max_processes: per-program sandbox limits (MB of address space, tasks).
        workers: programs run in parallel (per rank).
        python: the interpreter that runs the programs (null: this one); the suite's libraries must be in it.
        isolation: ``auto`` (bubblewrap where it starts, else namespaces; neither: refused), ``bwrap``,
            ``namespaces`` (each required) or ``process`` (the weakest, only by name): see sandbox.py.
        select_by: ``loss``, ``pass@1`` or ``pass@K`` (a K of ``k``): what early stopping and the best checkpoint
            follow.
        seed: seeds the sampled answers (each evaluation samples alike; training's RNG is left untouched).
    """

    tasks: dict[str, str] = field(default_factory=dict)
    num_samples: int = 0
    k: list[int] | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8
    cpu_threads: int | None = 1
    every_n_steps: int | None = None
    max_problems: int | None = None
    timeout_s: float | None = None
    memory_mb: int | None = 4096
    max_processes: int = 64
    workers: int = 2
    python: str | None = None
    isolation: Literal["auto", "bwrap", "namespaces", "process"] = "auto"
    select_by: str = "loss"
    seed: int = 0

    @property
    def ks(self) -> list[int]:
        """The k of the sampled pass@k."""
        if self.num_samples < 2:
            return []
        return sorted(set(self.k or [self.num_samples]))

    @classmethod
    def value_problems(cls, section: dict) -> list[tuple[str, str]]:
        """``(key, problem)`` for every value of an ``eval.code`` section a run would refuse (types are checked by
        the schema already); eval files are read, so their bad records are listed as ``path:line: field: ...``."""
        out = []
        opts = {f: section.get(f, getattr(cls(), f)) for f in cls.__dataclass_fields__}

        def num(key, ok, expected):
            value = opts[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
                out.append((key, f"is {value!r}: expected {expected}"))

        tasks = opts["tasks"]
        if not isinstance(tasks, dict) or not tasks:
            out.append(("tasks", "expected a mapping TASK: eval set (a .jsonl file, humaneval or "
                                 f"dataframebench:TASK), e.g. {{{DATAFRAMEBENCH_TASKS[0]}: dataframebench:"
                                 f"{DATAFRAMEBENCH_TASKS[0]}}}"))
        else:
            # Imported here: suites reads records (the data package, torch), which `mft eval --help` never needs.
            from mft_components.code_eval.suites import EvalSetError, check_task_source, read_eval_file

            for name, source in tasks.items():
                problem = check_task_source(source)
                if problem:
                    out.append((f"tasks.{name}", problem))
                elif source.endswith(".jsonl"):
                    try:
                        read_eval_file(source)
                    except EvalSetError as e:
                        out.append((f"tasks.{name}", str(e)))
        num("num_samples", lambda v: v >= 0, "0 (greedy only) or more")
        for key in ("max_new_tokens", "batch_size", "max_processes", "workers"):
            num(key, lambda v: v >= 1, "a positive integer")
        for key in ("every_n_steps", "max_problems", "cpu_threads"):
            if opts[key] is not None:
                num(key, lambda v: v >= 1, "a positive integer or null")
        if opts["timeout_s"] is not None:
            num("timeout_s", lambda v: v > 0, "seconds > 0 or null (each suite's default)")
        num("top_p", lambda v: 0 < v <= 1, "0 < top_p <= 1")
        if opts["memory_mb"] is not None:
            num("memory_mb", lambda v: v >= 64, "at least 64 (MB) or null")
        n = opts["num_samples"] if isinstance(opts["num_samples"], int) else 0
        if n > 0:
            num("temperature", lambda v: v > 0, "> 0 when num_samples > 0 (sampled answers)")
        ks = opts["k"] or ([n] if n >= 2 else [])
        if isinstance(ks, list):
            for k in ks:
                if isinstance(k, int) and k >= 2 and n < k:
                    out.append(("k", f"{k!r}: pass@{k} needs num_samples >= {k} sampled answers per problem (it is "
                                     f"{n}); raise eval.code.num_samples or lower k"))
                elif not isinstance(k, int) or not 2 <= k <= max(n, 1):
                    out.append(("k", f"{k!r}: each k must lie in 2..num_samples ({n}); pass@1 is the greedy one"))
        choices = ["loss", "pass@1"] + [f"pass@{k}" for k in ks if isinstance(k, int) and k >= 2]
        if opts["select_by"] not in choices:
            out.append(("select_by", f"is {opts['select_by']!r}: expected one of {', '.join(choices)}"))
        python_ok = opts["python"] is None or shutil.which(str(opts["python"])) is not None
        if not python_ok:
            out.append(("python", f"{opts['python']!r} is not an executable interpreter"))
        if opts["isolation"] == "bwrap" and shutil.which("bwrap") is None:
            out.append(("isolation", "bwrap: `bwrap` is not installed (apt-get install bubblewrap), or use auto"))
        if opts["isolation"] not in ("auto", "bwrap", "namespaces", "process"):
            out.append(("isolation", f"is {opts['isolation']!r}: expected auto, bwrap, namespaces or process"))
        elif opts["isolation"] == "bwrap" and shutil.which("bwrap") and python_ok:
            problem = bwrap_problem(opts["python"])
            if problem:
                out.append(("isolation", problem.removeprefix("isolation: ")))
        elif opts["isolation"] == "namespaces" or (opts["isolation"] == "auto" and (
                shutil.which("bwrap") is None or (python_ok and bwrap_problem(opts["python"])))):
            problem = namespaces_problem(shutil.which(str(opts["python"] or "")) or sys.executable)
            if problem:
                out.append(("isolation", f"{opts['isolation']}: Linux namespaces are not permitted here ({problem})"
                                         + ("" if opts["isolation"] == "namespaces" else
                                            " and bwrap is not installed" if shutil.which("bwrap") is None else
                                            " and bwrap does not start")
                                         + "; install bubblewrap, or ask for the weakest isolation: process"))
        return out

    @classmethod
    def from_config(cls, section: dict) -> "CodeEvalOptions":
        """Options from a config section, refusing what :meth:`value_problems` finds.

        Raises:
            CodeEvalError: ``eval.code.KEY: problem`` lines.
        """
        unknown = set(section) - set(cls.__dataclass_fields__)
        problems = [(k, "unknown key") for k in sorted(unknown)] + cls.value_problems(section)
        if problems:
            raise CodeEvalError("\n".join(f"eval.code.{k}: {p}" for k, p in problems))
        return cls(**section)


def bwrap_problem(python: str | None) -> str | None:
    """Why ``isolation: bwrap`` does not start here (None: it gives a verdict), found as a run finds it: the
    sandbox's own probe program (bubblewrap installed is not enough: as root it once never started)."""
    from mft_components.code_eval.sandbox import Sandbox, SandboxError

    try:
        Sandbox(python=python, workers=1, isolation="bwrap").close()
    except SandboxError as e:
        return str(e)
    return None
