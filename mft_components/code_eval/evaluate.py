"""Execution-based evaluation: generate answers, run them with their tests, score pass@k per task.

    eval sets (suites.py) --ChatFormat.prompt_ids--> prompts
      --inference/decoding.py (this rank's share, batched, KV cache)--> answers --suites.extract_code--> code
      --sandbox.py (this rank's share, N workers)--> verdicts --gathered from every rank-->
      pass@1 (greedy) and pass@k (num_samples sampled answers, unbiased estimator) per task; overall = task mean

Three callers: the recipes (:class:`CodeEvaluator`, next to the validation-loss ``Evaluator``: before training, every
``eval.code.every_n_steps`` and at the end; results in ``metrics.jsonl`` / TensorBoard / the progress output and
``mft_checkpoint.json``; ``select_by: pass@1`` makes early stopping and the best checkpoint follow it) and
``mft eval`` (:func:`run`, a checkpoint, an exported directory or a base model), and ``mft pairs`` (``pairs.py``:
sampled answers and their verdicts become preference pairs). The ``eval.code`` options are ``options.py``.
"""


from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mft_components.code_eval.eval_args import (add_arguments, add_model_arguments, add_option_arguments,
                                                options_from_arguments)
from mft_components.code_eval.options import CodeEvalError, CodeEvalOptions
from mft_components.code_eval.pass_at_k import mean_pass_at_k
from mft_components.code_eval.sandbox import ISOLATIONS, Limits, Sandbox, SandboxError
from mft_components.code_eval.suite_check import run_check, suite_tasks as check_suite_tasks
from mft_components.code_eval.suites import (DATAFRAMEBENCH_TASKS, DEFAULT_TIMEOUT_S, EvalSetError, Problem,
                                             extract_code, load_task)
from mft_components.config.core import to_container
from mft_components.distributed import get_rank, get_world_size, is_distributed, run_in_step
from mft_components.inference.decoding import Generated, batches_needed, generate_batched
from mft_components.inference.generate import GenerateError, load_generation_model
from mft_components.training.checkpoint import ADAPTER_CONFIG, META_FILE, read_checkpoint_meta

__all__ = ["CodeEvalError", "CodeEvalOptions", "CodeEvalResult", "CodeEvaluator", "evaluate_code", "generate_answers",
           "execute_answers", "format_table", "load_tasks", "make_sandbox", "write_records", "add_model_arguments",
           "add_option_arguments", "options_from_arguments", "suite_tasks", "load_model", "with_training_eos",
           "add_arguments", "run"]

NO_CODE = "no code block in the answer"


@dataclass
class CodeEvalResult:
    """One evaluation: ``metrics`` (``pass@1``, ``task_pass@1``, ``pass@K``, ``task_pass@K``, ``task_problems``,
    seconds, the sandbox's isolation), and ``records``, one per answer with its verdict."""

    metrics: dict[str, Any]
    records: list[dict]


def load_tasks(options: CodeEvalOptions) -> dict[str, list[Problem]]:
    """Each task's problems (the first ``options.max_problems``); ``options.timeout_s``, when set, replaces the
    suites' default timeouts (taking the options whole: no caller can drop the user's timeout)."""
    out = {name: load_task(source)[:options.max_problems] for name, source in options.tasks.items()}
    if options.timeout_s is not None:
        for problems in out.values():
            for p in problems:
                p.timeout_s = options.timeout_s
    return out


def make_sandbox(options: CodeEvalOptions, hide: list[str] | tuple = ()) -> Sandbox:
    """The sandbox of ``options``; ``hide``: more directories its programs must not see (the run's output_dir)."""
    limits = Limits(timeout_s=options.timeout_s or DEFAULT_TIMEOUT_S, memory_mb=options.memory_mb,
                    max_processes=options.max_processes)
    return Sandbox(python=options.python, workers=options.workers, limits=limits, isolation=options.isolation,
                   hide=hide)


def evaluate_code(model: torch.nn.Module, tokenizer, chat_format, tasks: dict[str, list[Problem]],
                  options: CodeEvalOptions, sandbox: Sandbox) -> CodeEvalResult:
    """Generate, run and score every problem of every task (collective under torchrun: every rank calls it).

    Args:
        model: the ``MFTModel`` being trained (possibly FSDP2-sharded) or a loaded transformers model.
        tokenizer, chat_format: the training tokenizer and ``ChatFormat`` (prompts and EOS as in training).
        tasks: task -> problems (:func:`load_tasks`).
        options: decoding and scoring settings.
        sandbox: where programs run (this rank's).
    """
    start = time.perf_counter()
    items, answers = generate_answers(model, tokenizer, chat_format, tasks, options, greedy=True)
    if options.num_samples:
        sampled_items, sampled = generate_answers(model, tokenizer, chat_format, tasks, options, greedy=False)
        items, answers = items + sampled_items, answers + sampled
    generate_s = time.perf_counter() - start
    records, execute_s = execute_answers(items, answers, tokenizer, sandbox)
    if is_distributed():
        times = torch.tensor([generate_s], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        generate_s = times.item()
    order = {t: n for n, t in enumerate(tasks)}
    records.sort(key=lambda r: (order[r["task"]], r["index"], -1 if r["sample"] == "greedy" else r["sample"]))
    metrics = _score(records, tasks, options.ks)
    metrics.update(seconds=time.perf_counter() - start, generate_s=generate_s, execute_s=execute_s,
                   isolation=sandbox.isolation)
    return CodeEvalResult(metrics=metrics, records=records)


def generate_answers(model: torch.nn.Module, tokenizer, chat_format, tasks: dict[str, list[Problem]],
                     options: CodeEvalOptions, greedy: bool) -> tuple[list[tuple], list[Generated]]:
    """This rank's share of the answers to every problem (collective under torchrun: every rank calls it).

    Args:
        greedy: one greedy answer per problem; else ``options.num_samples`` sampled ones (temperature, top_p),
            from their own RNG stream seeded by ``options.seed`` and the rank (the caller's RNG is left untouched).

    Returns:
        ``(items, answers)``: ``(task, index, problem, sample)`` of each answer (``sample`` is ``"greedy"`` or its
        number), and the answers in that order; :func:`execute_answers` takes both.
    """
    rank, world = get_rank(), get_world_size()
    problems = [(task, i, p) for task, ps in tasks.items() for i, p in enumerate(ps)]
    if greedy:
        items = [(t, i, p, "greedy") for t, i, p in problems[rank::world]]
        total = len(problems)
    else:
        items = [(t, i, p, s) for t, i, p in problems for s in range(options.num_samples)][rank::world]
        total = len(problems) * options.num_samples
    if not total:
        return [], []
    prompt_ids = {(t, i): chat_format.prompt_ids(p.messages, tokenizer) for t, i, p, _ in items}
    prompts = [prompt_ids[t, i] for t, i, _, _ in items]
    gen = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               max_new_tokens=options.max_new_tokens, batch_size=options.batch_size, cpu_threads=options.cpu_threads,
               # Every rank runs as many generate calls as the busiest rank (FSDP2's all-gathers are collective).
               min_batches=batches_needed(math.ceil(total / world), options.batch_size))
    if greedy:
        return items, generate_batched(model, prompts, greedy=True, **gen)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(options.seed * 1000 + rank)
        return items, generate_batched(model, prompts, greedy=False, temperature=options.temperature,
                                       top_p=options.top_p, **gen)


def execute_answers(items: list[tuple], answers: list[Generated], tokenizer,
                    sandbox: Sandbox) -> tuple[list[dict], float]:
    """Run this rank's answers with their tests and gather every rank's records (collective under torchrun).

    Ranks finish their programs at different times (a program that hangs costs its whole timeout), so they wait
    for each other in step (``distributed.run_in_step``), not inside the gather, where a wait longer than
    ``distributed_timeout_s`` would end the run.

    Args:
        items: ``(task, index, problem, sample)`` of each answer (``sample`` is ``"greedy"`` or its number).
        answers: this rank's generated answers, in the order of ``items``.

    Returns:
        (the records of every rank, the seconds the slowest rank spent running its programs).
    """
    start = time.perf_counter()
    records = run_in_step(lambda: _run(items, answers, tokenizer, sandbox))
    execute_s = time.perf_counter() - start
    if is_distributed():
        gathered = [None] * get_world_size()
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    return records, execute_s


def _run(items: list[tuple], answers: list[Generated], tokenizer, sandbox: Sandbox) -> list[dict]:
    records, programs, where = [], [], []
    for (task, index, problem, sample), answer in zip(items, answers):
        text = tokenizer.decode(answer.new_ids, skip_special_tokens=False)
        code = extract_code(text)
        records.append({"task": task, "task_id": problem.task_id, "index": index, "sample": sample,
                        "completion": text, "finished": answer.finished, "code": code,
                        "status": "failed", "reason": NO_CODE, "output": ""})
        if code is not None:
            programs.append(problem.program(code))
            where.append(len(records) - 1)
    for n, result in zip(where, sandbox.run_many(programs)):
        records[n].update(status=result.status, reason=result.reason, output=result.output[-2000:],
                          seconds=round(result.seconds, 3), tests=result.tests)
    return records


def _score(records: list[dict], tasks: dict[str, list[Problem]], ks: list[int]) -> dict[str, Any]:
    """pass@k per task and overall. Answers the sandbox could not run (status ``error``: a setup failure, not a
    verdict) are left out of n; a problem left with fewer than k answers is left out of that task's pass@k
    (``task_errors`` counts those answers per task)."""
    metrics: dict[str, Any] = {"task_problems": {t: len(ps) for t, ps in tasks.items()},
                               "task_errors": {t: sum(r["task"] == t and r["status"] == "error" for r in records)
                                               for t in tasks}}
    for name in ["pass@1", *(f"pass@{k}" for k in ks)]:
        k = int(name.split("@")[1])
        per_task = {}
        for task, ps in tasks.items():
            verdicts: dict[int, list[bool]] = {i: [] for i in range(len(ps))}
            for r in records:
                if (r["task"] == task and (r["sample"] == "greedy") == (name == "pass@1")
                        and r["status"] != "error"):
                    verdicts[r["index"]].append(r["status"] == "passed")
            per_task[task] = mean_pass_at_k([v for v in verdicts.values() if len(v) >= k], k)
        metrics[name] = sum(per_task.values()) / len(per_task) if per_task else math.nan
        metrics[f"task_{name}"] = per_task
    return metrics


def format_table(metrics: dict[str, Any], ks: list[int]) -> str:
    """Per-task pass@k as an aligned table, with the overall (task mean) last."""
    names = ["pass@1", *(f"pass@{k}" for k in ks)]
    tasks = list(metrics["task_problems"])
    width = max(len("overall"), *map(len, tasks))
    lines = [f"{'task':<{width}}  problems  " + "  ".join(f"{n:>8}" for n in names)]
    for t in tasks:
        lines.append(f"{t:<{width}}  {metrics['task_problems'][t]:>8}  "
                     + "  ".join(f"{metrics[f'task_{n}'][t]:>8.3f}" for n in names))
    lines.append(f"{'overall':<{width}}  {sum(metrics['task_problems'].values()):>8}  "
                 + "  ".join(f"{metrics[n]:>8.3f}" for n in names))
    return "\n".join(lines)


def write_records(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# -------------------------------------------------------------------------------------------------- recipes


class CodeEvaluator:
    """The recipe's execution evaluation: when to run, what to log, the best pass@k (``select_by``).

    Built before the model (a bad eval set or interpreter costs no model load); disabled without ``eval.code``.

    Args:
        options: the ``eval.code`` section, or None.
        tokenizer, chat_format: the training tokenizer and ``ChatFormat``.
    """

    def __init__(self, options: CodeEvalOptions | None, tokenizer, chat_format):
        self.options = options
        self.enabled = options is not None
        self.tokenizer, self.chat_format = tokenizer, chat_format
        self.last: tuple[int, dict] | None = None
        self.best: tuple[int, dict] | None = None
        self.logger = self.progress = self.output_dir = self.early_stopping = None
        if self.enabled:
            try:
                self.tasks = load_tasks(options)
                self.sandbox = make_sandbox(options)
            except (EvalSetError, SandboxError) as e:
                raise CodeEvalError(str(e)) from e

    @classmethod
    def from_config(cls, section, tokenizer, chat_format) -> "CodeEvaluator":
        """From ``cfg.eval.code`` (None or a mapping).

        Raises:
            CodeEvalError: bad options, eval records or interpreter.
        """
        if section is None:
            return cls(None, tokenizer, chat_format)
        return cls(CodeEvalOptions.from_config(to_container(section)), tokenizer, chat_format)

    @property
    def selects(self) -> bool:
        """True when early stopping and the best checkpoint follow a pass@k instead of the validation loss."""
        return self.enabled and self.options.select_by != "loss"

    def early_stopping_kwargs(self) -> dict:
        """``EarlyStopping`` arguments for what is selected by (none for the validation loss)."""
        return {"metric": self.options.select_by, "higher_is_better": True} if self.selects else {}

    def close(self) -> None:
        """Remove the sandbox's cgroup now: a torchrun worker ends without finalization (`distributed.end_worker`),
        where the sandbox's ``__del__`` would have removed it."""
        if self.enabled:
            self.sandbox.close()

    def attach(self, logger, progress, output_dir: str | Path, early_stopping) -> None:
        """Where results go (rank 0 writes), and the tracker ``select_by`` feeds."""
        self.logger, self.progress, self.output_dir = logger, progress, Path(output_dir)
        self.early_stopping = early_stopping
        if self.enabled:
            self.sandbox.hide_also(self.output_dir)  # a program must not read or write the run's checkpoints
            progress.write(f"code evaluation: {', '.join(f'{t} ({len(p)} problems)' for t, p in self.tasks.items())}; "
                           f"isolation: {self.sandbox.isolation}")

    def due(self, step: int, loss_due: bool) -> bool:
        if not self.enabled:
            return False
        every = self.options.every_n_steps
        return step % every == 0 if every else loss_due

    def evaluated(self, step: int) -> bool:
        return not self.enabled or (self.last is not None and self.last[0] == step)

    def run(self, model: torch.nn.Module, step: int, track: bool = True) -> bool:
        """Evaluate (collective), log, and feed ``select_by``; returns True on a new best (when it selects).

        ``track=False`` (before training) logs without feeding early stopping, as the loss evaluation does.
        """
        result = evaluate_code(model, self.tokenizer, self.chat_format, self.tasks, self.options, self.sandbox)
        metrics = result.metrics
        improved = False
        if track:
            self.last = (step, metrics)
            if self.selects:
                improved = self.early_stopping.update(step, metrics[self.options.select_by])
                if improved:
                    self.best = (step, metrics)
        if self.logger is not None and self.logger.enabled:
            self.logger.log("code_eval", step, {k: v for k, v in metrics.items() if k != "task_problems"})
            if self.output_dir is not None:
                write_records(result.records, self.output_dir / "code_eval" / f"step_{step}.jsonl")
        if self.progress is not None:
            per_task = "  ".join(f"{t} {round(v * len(self.tasks[t]))}/{len(self.tasks[t])}"
                                 for t, v in metrics["task_pass@1"].items())
            extra = "".join(f" pass@{k} {metrics[f'pass@{k}']:.3f}" for k in self.options.ks)
            errors = sum(metrics["task_errors"].values())
            self.progress.write(f"step {step} code eval pass@1 {metrics['pass@1']:.3f}{extra}"
                                f"{' (best)' if improved else ''}: {per_task} ({metrics['seconds']:.0f}s)"
                                + (f"; {errors} answers not run (sandbox errors, left out)" if errors else ""))
        return improved

    def best_task_values(self) -> dict[str, float] | None:
        """Per task, the ``select_by`` pass rate of the best evaluation (None unless it selects the best step)."""
        if not self.selects or self.best is None:
            return None
        return dict(self.best[1][f"task_{self.options.select_by}"])

    def checkpoint_meta(self) -> dict:
        """What ``mft_checkpoint.json`` records of the last evaluation."""
        if self.last is None:
            return {}
        return {"code_eval": {"step": self.last[0], **self.last[1]}}

    def state_dict(self) -> dict:
        return {"last": list(self.last) if self.last else None, "best": list(self.best) if self.best else None}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.last = tuple(state["last"]) if state.get("last") else None
        self.best = tuple(state["best"]) if state.get("best") else None


# ---------------------------------------------------------------------------------------------------- mft eval


def suite_tasks(suite: str, task_names: list[str] | None) -> dict[str, str]:
    """``--suite`` and ``--task`` -> task name -> eval set (``eval.code.tasks``).

    Raises:
        ValueError: more than one ``--task`` for a suite that is one task.
    """
    if suite == "dataframebench":
        names = task_names or list(DATAFRAMEBENCH_TASKS)
        return {t: f"dataframebench:{t}" for t in names}
    if len(task_names or []) > 1:
        raise ValueError(f"--task: one name for {'humaneval' if suite == 'humaneval' else 'an eval file'} "
                         f"(it names the task in the results), got {task_names}")
    if suite == "humaneval":
        return {(task_names or ["humaneval"])[0]: "humaneval"}
    return {(task_names or [Path(suite).stem])[0]: suite}


def load_model(model: str, template: str | None, dtype: str, device: str | None, trust_remote_code: bool = False):
    """A ``GenerationModel`` from ``--model``: a LoRA / QLoRA checkpoint (its base with the adapter merged), an
    exported directory, a full checkpoint or a base model (with ``template``, the chat format to prompt it with).

    Raises:
        GenerateError: what is missing or refused, and for a base model without ``template`` how to prompt it.
    """
    path = Path(model)
    fallback = {"template": template} if template else None
    if (path / ADAPTER_CONFIG).is_file() and (path / META_FILE).is_file():  # a LoRA / QLoRA checkpoint
        base = read_checkpoint_meta(path).get("base_model_dir")
        return load_generation_model(base, adapter=path, dtype=dtype, device=device, default_chat_format=fallback,
                                     trust_remote_code=trust_remote_code)
    try:
        return load_generation_model(path, dtype=dtype, device=device, default_chat_format=fallback,
                                     trust_remote_code=trust_remote_code)
    except GenerateError as e:
        if template is None and str(e).startswith("no training chat format"):  # a base model: say how to prompt it
            raise GenerateError(f"{e}; for a model mft did not train, pass --template hf (its tokenizer's "
                                "chat_template) or --template mft (MFTCoder's markers)") from None
        raise


def _check_suite(args: argparse.Namespace) -> int:
    """``mft eval --check-suite SUITE``: status 0 when every canonical solution passes, 1 when one does not."""
    try:
        tasks = check_suite_tasks(args.check_suite, args.task)
        options = options_from_arguments(args, tasks)
        sandbox = make_sandbox(options)
    except (ValueError, SandboxError) as e:
        print(f"mft eval: error: {e}", file=sys.stderr)
        return 2
    try:
        return run_check(tasks, options, sandbox)
    finally:
        sandbox.close()


def run(args: argparse.Namespace) -> int:
    """``mft eval``: per-task table on stdout, every answer with its verdict in ``--output``; errors: status 2."""
    if args.check_suite:
        return _check_suite(args)
    if not args.model or not args.suite:
        print("mft eval: error: --model and --suite are required (or --check-suite SUITE)", file=sys.stderr)
        return 2
    try:
        options = options_from_arguments(args, suite_tasks(args.suite, args.task))
        problems = load_tasks(options)
        sandbox = make_sandbox(options)
        gm = load_model(args.model, args.template, args.dtype, args.device, args.trust_remote_code)
    except (ValueError, SandboxError, GenerateError) as e:  # CodeEvalError, EvalSetError are ValueErrors
        print(f"mft eval: error: {e}", file=sys.stderr)
        return 2
    print(f"isolation: {sandbox.isolation}", file=sys.stderr)
    tokenizer = with_training_eos(gm.tokenizer, gm.eos_token_id)
    result = evaluate_code(gm.model, tokenizer, gm.chat_format, problems, options, sandbox)
    sandbox.close()
    write_records(result.records, args.output)
    print(format_table(result.metrics, options.ks))
    m = result.metrics
    if any(m["task_errors"].values()):
        print("answers the sandbox could not run (status error, left out of pass@k): "
              + ", ".join(f"{t} {n}" for t, n in m["task_errors"].items() if n), file=sys.stderr)
    print(f"{len(result.records)} answers in {m['seconds']:.1f}s (generation {m['generate_s']:.1f}s, execution "
          f"{m['execute_s']:.1f}s); answers and verdicts: {args.output}")
    return 0


def with_training_eos(tokenizer, eos_token_id: int):
    """The tokenizer with the training EOS (a checkpoint may declare another than the tokenizer's)."""
    if tokenizer.eos_token_id != eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)
    return tokenizer
