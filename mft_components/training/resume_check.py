"""What a resumed run may change: one table of config keys, refused or applied, and what a checkpoint records.

    record = run_record(config)                  # what this run trains with: model, tokenizer and data fingerprints
    meta = {..., "config": config, "trained_with": record, "position": {...}, "changes": [...]}   # each checkpoint
    check = check_resume(read_checkpoint_meta(ckpt), config, record)   # on resume
    check.raise_refusals(ckpt)                   # ResumeError naming every refused key, both values and why
    check.changes                                # [{"step", "key", "old", "new", "note"}]: applied from "step" on

A resumed run compares its config with the one the checkpoint was trained with, key by key, after filling in the
builders' defaults (an absent key and its default are the same). Every difference is looked up in
:data:`RESUME_RULES` (the longest matching key or ``prefix.*``):

* ``refuse``: the saved state or data position would be meaningless (another model, LoRA shape, tasks, data
  layout, seed, loss mode, optimizer class...). The run stops before loading anything, naming the key.
* ``apply``: the run uses the new value from the next step on and says so (``optimizer.lr: 0.001 -> 0.005 from
  step 5``); the checkpoints it writes record it in ``changes``. The recipe state holds no copy of these values
  that would override them: the optimizer keeps this run's hyperparameters and the schedule is rebased on this
  run's lr and length (``state.restore_training_state``).
* ``ignore``: ``resume`` itself.

A key the table does not know (a custom recipe's) is applied and printed. Besides the keys, the content behind
the paths is compared with what the checkpoint recorded (``trained_with``): the base model's ``config.json``, the
tokenizer's files, the tasks in order, and each task's files (sha256). Another model or tokenizer, or other tasks,
are refused; changed data files are refused mid-epoch (the saved data position counts the old samples) and applied
at an epoch end (the next epoch draws from the new data). A path that moved with the same content is applied.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mft_components.assets.cache import file_sha256
from mft_components.config.core import COMPONENT_KEY, ConfigError, import_object
from mft_components.data.records import DataError
from mft_components.data.tasks import discover_tasks
from mft_components.data.tables import TableSource
from mft_components.models.build import resolve_lora_config
from mft_components.training.checkpoint import ResumeError

__all__ = ["REFUSE", "APPLY", "IGNORE", "Rule", "RESUME_RULES", "rule_for", "run_record", "check_resume",
           "ResumeCheck"]

REFUSE, APPLY, IGNORE = "refuse", "apply", "ignore"


@dataclass(frozen=True)
class Rule:
    """What a resumed run does when a key differs from the checkpoint's, and why (shown with a refusal), or a
    note shown with an applied change."""

    action: str
    why: str = ""


def _refuse(why: str) -> Rule:
    return Rule(REFUSE, why)


def _apply(note: str = "") -> Rule:
    return Rule(APPLY, note)


_POSITION = "the saved data position counts rows of the old layout"
_SCHEDULE_TOTAL = "the learning-rate schedule's total follows it"

RESUME_RULES: dict[str, Rule] = {
    # what the saved state belongs to
    "seed": _refuse("the validation split, the data order and the saved RNG streams follow the seed"),
    "dtype": _refuse("the weights and the optimizer's moments were saved in the checkpoint's dtype"),
    "model._component_": _refuse("another model builder"),
    "model.model_dir": _apply("the same model at another path (its config.json is compared)"),
    "model.method": _refuse("lora, qlora and full save different weights and optimizer state"),
    "model.lora.rank": _refuse("the adapter's matrices are rank wide"),
    "model.lora.alpha": _refuse("the adapter was trained at the scale alpha / rank (alpha / sqrt(rank) with "
                                "use_rslora): another scale changes what it computes"),
    "model.lora.use_rslora": _refuse("the adapter was trained at the scale alpha / rank or alpha / sqrt(rank)"),
    "model.lora.target_modules": _refuse("the adapter holds matrices for exactly these modules"),
    "model.lora.dropout": _apply(),
    "model.*": _apply(),  # how it computes: attn_implementation, compile, activation_checkpointing, liger, ...
    "tokenizer._component_": _refuse("another tokenizer builder: the token ids the data position counts"),
    "tokenizer.path": _apply("the same tokenizer files at another path (their content is compared)"),
    "tokenizer.*": _apply(),
    "data._component_": _refuse("another data builder: the samples the data position counts"),
    "data.data_paths": _apply("the same tasks and content at other paths (both are compared)"),
    "data.valid_data_paths": _refuse("validation files instead of a held-out split change which samples train"),
    "data.valid_ratio": _refuse("the held-out split decides which samples train"),
    "data.valid_size": _refuse("the held-out split decides which samples train"),
    "data.template": _refuse("the tokens every sample trains on"),
    "data.role_markers": _refuse("the tokens every sample trains on"),
    "data.add_bos": _refuse("the tokens every sample trains on"),
    "data.seq_len": _refuse(f"rows of seq_len tokens: {_POSITION}"),
    "data.packing": _refuse(f"samples per row: {_POSITION}"),
    "data.truncation": _refuse("which samples exist and how long they are: " + _POSITION),
    "data.task_sampling": _refuse("each epoch's order of batches, which the saved data position points into"),
    "data.temperature": _refuse("each epoch's order of batches, which the saved data position points into"),
    "data.max_length": _refuse("how long each preference pair is, and so the rows: " + _POSITION),
    "data.max_prompt_length": _refuse("how long each preference pair is, and so the rows: " + _POSITION),
    "data.*": _apply(),  # on_bad_record (a bad record stops the run while reading), num_workers, cache_dir
    "loss._component_": _refuse("another loss: its saved state (CoBa history) is this loss's"),
    "loss.mode": _refuse("what was optimised, and the loss's saved state (CoBa history)"),
    "loss.preference": _refuse("another preference objective: what was optimised so far"),
    "loss.*": _apply(),  # task_weights, chunk_size, projection_dtype, cross_entropy, coba_*, router_aux_loss_coef
    "optimizer._component_": _refuse("the saved optimizer state is this optimizer's"),
    "optimizer.amsgrad": _refuse("amsgrad keeps one more moment per parameter than the saved state has"),
    "optimizer.lr": _apply("the schedule continues from this peak lr"),
    "optimizer.*": _apply(),  # weight_decay, betas, eps, ...
    "lr_scheduler._component_": _refuse("the saved schedule state is this scheduler's"),
    "lr_scheduler.*": _apply("the schedule follows it"),  # warmup_steps, min_lr
    "epochs": _apply(_SCHEDULE_TOTAL),
    "max_steps": _apply(_SCHEDULE_TOTAL),
    "micro_batch_size": _apply("the same global batch continues mid-epoch; another one only at an epoch end"),
    "gradient_accumulation_steps": _apply("the same global batch continues mid-epoch; another one only at an "
                                          "epoch end"),
    "eval.code.select_by": _refuse("early stopping's best value and patience count are kept for the metric "
                                   "it names"),
    "eval.*": _apply(),
    "resume": Rule(IGNORE, "how this run starts, not what it trains"),
    # read as the run goes: applied from the next step
    "output_dir": _apply(),
    "clip_grad_norm": _apply(),
    "eval_every_n_steps": _apply(),
    "eval_micro_batch_size": _apply(),
    "early_stopping_patience": _apply("counted on from the checkpoint's evaluations without a new best"),
    "save_every_n_steps": _apply(),
    "saving_limit": _apply(),
    "log_every_n_steps": _apply(),
    "tensorboard": _apply(),
    "plots": _apply(),
    "metric_loggers": _apply("the W&B / MLflow runs in the checkpoint's recipe state continue; an added logger "
                             "starts a run"),
    "distributed_timeout_s": _apply(),
    "save_on_preemption": _apply(),
    "preemption_grace_s": _apply(),
    "reference": _apply("the same reference log-probs, computed on the fly or read from output_dir"),
}
_UNKNOWN = _apply("a key mft has no resume rule for: applied as given")
_ABSENT = object()


def rule_for(key: str) -> Rule:
    """The rule of a dotted config key: its own entry, else the nearest ``prefix.*``, else applied (printed)."""
    if key in RESUME_RULES:
        return RESUME_RULES[key]
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        rule = RESUME_RULES.get(".".join(parts[:n]) + ".*")
        if rule is not None:
            return rule
    return _UNKNOWN


# ------------------------------------------------------------------------------------------ the record


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def run_record(config: dict, hash_data: bool = True) -> dict[str, Any]:
    """What a run trains with, beyond its config: the base model's ``config.json``, the tokenizer's files and each
    task's files, as sha256 fingerprints (mft's own builders only; what cannot be read is left out, for the build
    to report).

    Args:
        config: the run's resolved config.
        hash_data: read and hash every data file (else only the task names are recorded).

    Returns:
        ``{"model": {"model_dir", "config_sha256", "model_type", "architectures"}, "tokenizer": {"path",
        "files_sha256"}, "task_names": [...], "tasks": {task: [{"path", "size", "sha256"}]}}`` (each only where
        known).
    """
    record: dict[str, Any] = {}
    model_dir = _builder_arg(config.get("model"), "mft_components.models.build_model", "model_dir")
    config_json = Path(os.path.expanduser(str(model_dir))) / "config.json" if model_dir else None
    if config_json is not None and config_json.is_file():
        text = config_json.read_bytes()
        try:
            parsed = json.loads(text)
            canonical = json.dumps(parsed, sort_keys=True).encode()
        except ValueError:
            parsed, canonical = {}, text
        record["model"] = {"model_dir": str(model_dir), "config_sha256": hashlib.sha256(canonical).hexdigest(),
                           "model_type": parsed.get("model_type"), "architectures": parsed.get("architectures")}
    path = _builder_arg(config.get("tokenizer"), "mft_components.models.load_tokenizer", "path")
    if path and Path(os.path.expanduser(str(path))).is_dir():
        files = hashlib.sha256()
        for name in _TOKENIZER_FILES:
            file = Path(os.path.expanduser(str(path))) / name
            if file.is_file():
                files.update(f"{name}\0{file_sha256(file)}\0".encode())
        record["tokenizer"] = {"path": str(path), "files_sha256": files.hexdigest()}
    paths = _builder_arg(config.get("data"), "mft_components.data.build_mft_data", "data_paths")
    if paths:
        try:
            tasks = discover_tasks(paths)
        except DataError:
            tasks = None  # the data build names the problem
        if tasks is not None:
            record["task_names"] = list(tasks)
        if tasks is not None and hash_data:
            # one task per entry, in order; a `datasets` task is its data files
            roots = [Path(os.path.expanduser(str(p["path"] if isinstance(p, dict) else p))) for p in paths]
            record["tasks"] = {name: [{"path": str(f), "name": _name_in(f, root), "size": f.stat().st_size,
                                       "sha256": file_sha256(f)}
                                      for f in _data_files(files)]
                               for root, (name, files) in zip(roots, tasks.items())}
    return record


def _data_files(files: list) -> list[Path]:
    return [f for entry in files for f in (entry.files if isinstance(entry, TableSource) else [entry])]


def _name_in(file: Path, root: Path) -> str:
    """A task file's name within its task (compared across a task directory that moved)."""
    try:
        return str(file.relative_to(root)) if root.is_dir() else file.name
    except ValueError:
        return file.name


def _builder_arg(node: Any, builder: str, name: str) -> Any:
    """``node[name]`` when the node builds with mft's ``builder`` (another builder's arguments mean other things)."""
    if isinstance(node, dict) and isinstance(node.get(COMPONENT_KEY), str):
        try:
            if import_object(node[COMPONENT_KEY]) is import_object(builder):
                return node.get(name)
        except (ConfigError, ImportError):
            pass
    return None


# ------------------------------------------------------------------------------------------ comparing


@dataclass
class ResumeCheck:
    """What a resume would refuse (messages) and apply (``{"step", "key", "old", "new", "note"}``)."""

    refusals: list[str] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)

    def raise_refusals(self, checkpoint: str | os.PathLike) -> None:
        """Raises:
            ResumeError: naming every refused key, both values and why, and what to do instead.
        """
        if self.refusals:
            raise ResumeError(
                f"{checkpoint} was trained with another configuration; this run cannot continue it:\n  - "
                + "\n  - ".join(self.refusals)
                + "\nPut these values back to continue it, or start this configuration in another output_dir "
                  "(or move that run's checkpoints away)")

    def change_lines(self) -> list[str]:
        """``key: old -> new from step N (note)`` per applied change."""
        return [f"{c['key']}: {_show(c['old'])} -> {_show(c['new'])} from step {c['step']}"
                + (f" ({c['note']})" if c.get("note") else "") for c in self.changes]


def check_resume(meta: dict[str, Any], config: dict[str, Any], record: dict[str, Any]) -> ResumeCheck:
    """Compare a checkpoint's ``mft_checkpoint.json`` with this run's config and :func:`run_record`.

    Args:
        meta: the checkpoint's metadata (``config``, ``trained_with``, ``position``, ``task_names``, ``lora``,
            ``step``).
        config: this run's resolved config, with the schema's defaults filled in.
        record: :func:`run_record` of this run (a part left out is not compared).

    Returns:
        The refusals and the changes (applied from the step after the checkpoint's).
    """
    check = ResumeCheck()
    step = int(meta.get("step", 0)) + 1
    trained = meta.get("trained_with") or {}
    if isinstance(meta.get("config"), dict):
        # this run's model resolves its LoRA defaults (the checkpoint's where this one cannot be read: a model
        # that is missing stops the run anyway)
        trained_type = (trained.get("model") or {}).get("model_type")
        model_type = (record.get("model") or {}).get("model_type") or trained_type
        old = _flatten(_normalised(meta["config"], meta.get("lora"), trained_type))
        new = _flatten(_normalised(config, None, model_type))
        for key in sorted(set(old) | set(new), key=_key_order):
            a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
            if _same(a, b):
                continue
            rule = rule_for(key)
            if rule.action == REFUSE:
                check.refusals.append(f"{key}: {_show(a)} (checkpoint) -> {_show(b)} (this run): {rule.why}")
            elif rule.action == APPLY:
                check.changes.append({"step": step, "key": key, "old": _plain(a), "new": _plain(b), "note": rule.why})
    _compare_content(trained, meta, record, step, check)
    return check


_FINGERPRINTED = {"model.model_dir": ("model", "config_sha256", "config.json"),
                  "tokenizer.path": ("tokenizer", "files_sha256", "tokenizer files")}


def _compare_content(trained: dict, meta: dict, record: dict, step: int, check: ResumeCheck) -> None:
    """The model, the tokenizer and the data behind the paths, against what the checkpoint recorded."""
    for key, (part, fingerprint, what) in _FINGERPRINTED.items():
        old, new = trained.get(part), record.get(part)
        moved = [c for c in check.changes if c["key"] == key]
        if moved and not old:
            check.refusals.append(f"{key}: {_show(moved[0]['old'])} (checkpoint) -> {_show(moved[0]['new'])} (this "
                                  f"run): the checkpoint records no fingerprint of its {what} (an older mft wrote "
                                  "it), so another path cannot be told from another model")
        if old and new and old.get(fingerprint) != new.get(fingerprint):
            check.refusals.append(
                f"{key}: {_describe(old)} (checkpoint) -> {_describe(new)} (this run): another {what} (sha256 "
                f"{old.get(fingerprint, '')[:12]} -> {new.get(fingerprint, '')[:12]}); the checkpoint's weights and "
                "data position belong to the one it was trained with")
    old_tasks, new_tasks = meta.get("task_names"), record.get("task_names") or []
    if old_tasks is not None and new_tasks and list(old_tasks) != new_tasks:
        check.refusals.append(f"data.data_paths: tasks {list(old_tasks)} (checkpoint) -> {new_tasks} (this run): the "
                              "data position, task_weights and CoBa's state are per task, in this order")
        return
    old_files, new_files = trained.get("tasks"), record.get("tasks")
    if not (old_files and new_files):
        return
    changed = [line for task in new_tasks for line in _file_changes(task, old_files.get(task, []), new_files[task])]
    if not changed:
        return
    position = meta.get("position") or {}
    if position.get("epoch_complete"):
        check.changes.append({"step": step, "key": "data (content)", "old": None, "new": None,
                              "note": "; ".join(changed) + ": the checkpoint ends an epoch, the next one draws from "
                                                           "the new data"})
    else:
        where = (f"epoch {position['epoch']}, {position['step_in_epoch']} steps into it"
                 if "epoch" in position else "position unknown")
        check.refusals.append(f"data.data_paths: {'; '.join(changed)} since the checkpoint, which stopped mid-epoch "
                              f"({where}): the saved data position counts the old samples. Put the old files back, "
                              "or resume from a checkpoint at the end of an epoch")


def _file_changes(task: str, old: list[dict], new: list[dict]) -> list[str]:
    if sorted(f["sha256"] for f in old) == sorted(f["sha256"] for f in new):
        return []
    before, now = {f.get("name", f["path"]): f for f in old}, {f.get("name", f["path"]): f for f in new}
    lines = [f"task {task}: {f['path']} changed (sha256 {before[name]['sha256'][:12]} -> {f['sha256'][:12]})"
             for name, f in now.items() if name in before and before[name]["sha256"] != f["sha256"]]
    lines += [f"task {task}: {f['path']} is new" for name, f in now.items() if name not in before]
    lines += [f"task {task}: {f['path']} is gone" for name, f in before.items() if name not in now]
    return lines or [f"task {task}: its files' content changed"]


def _describe(part: dict) -> str:
    name = part.get("model_dir") or part.get("path")
    kind = "/".join(part.get("architectures") or []) or part.get("model_type")
    return f"{name} ({kind})" if kind else str(name)


def _normalised(config: dict, resolved_lora: dict | None, model_type: str | None) -> dict:
    """The config with every builder's defaults filled in, so that an absent key equals its default; LoRA settings
    resolved as the model resolves them (the checkpoint's ``lora`` record, or ``resolve_lora_config``)."""
    cfg = json.loads(json.dumps(copy.deepcopy(config), default=str))  # tuples -> lists, as the JSON record has them
    for section in ("model", "tokenizer", "data", "loss", "optimizer", "lr_scheduler"):
        node = cfg.get(section)
        if isinstance(node, dict) and COMPONENT_KEY in node:
            for name, value in _defaults(node[COMPONENT_KEY]).items():
                node.setdefault(name, value)
    model = cfg.get("model")
    if isinstance(model, dict) and "lora" in model:
        if model.get("method") == "full":
            model.pop("lora")  # unused
        elif isinstance(resolved_lora, dict):
            model["lora"] = resolved_lora
        elif model_type is not None:
            try:
                model["lora"] = resolve_lora_config(model["lora"], model_type)
            except (ValueError, TypeError):
                pass  # the model build names it
    eval_node = cfg.get("eval")
    if isinstance(eval_node, dict):
        code = eval_node.get("code")
        eval_node["code"] = {**(code if isinstance(code, dict) else {}), "select_by": (code or {}).get("select_by",
                                                                                                        "loss")}
    return cfg


def _defaults(component: str) -> dict[str, Any]:
    try:
        target = import_object(component)
        params = inspect.signature(target).parameters
    except (ConfigError, ImportError, TypeError, ValueError):
        return {}
    return {name: json.loads(json.dumps(p.default, default=str)) for name, p in params.items()
            if p.default is not p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node} if prefix else {}


def _key_order(key: str) -> tuple:
    return (key.count("."), key)


def _same(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or (a is not _ABSENT and b is not _ABSENT and a == b)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    return None if value is _ABSENT else value


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return json.dumps(value) if isinstance(value, (list, dict, str)) or value is None else repr(value)
