"""What a recipe config's schema cannot say: values inside the sections, checked against the model and the data.

It knows every component (models, data, loss, code evaluation), so it sits above them all. ``config.check_config``
runs these after the schema's key, type and bound checks, for ``mft validate`` and for
the recipes' ``@parse`` alike, so a run fails at its first line with the message ``mft validate`` gave::

    output_dir      not a file (nor under one)
    optimizer       ``lr`` a number >= 0; the optimizer and the scheduler accept their settings (both are
                    built over one dummy parameter: their own argument checks run, nothing is trained)
    model           ``attn_implementation`` a name mft trains with (``auto`` or ``models/attention.BACKENDS``: known,
                    keeping packed samples apart), ``liger`` kernel names; the architecture
                    of ``model_dir``'s config.json built on the meta device with LoRA applied
                    (``models/build.build_meta_model``: model_type known, safetensors present, LoRA rank / alpha /
                    dropout in range, ``target_modules`` matching linears of this architecture)
    tokenizer       loads, and can render the data's chat format (EOS, BOS, chat_template)
    data            option values and task files (``data/build.resolve_data_config``, what the data build runs first)
    loss            mode and options, ``task_weights`` against the task names of ``data``; CoBa has
                    validation data to follow (else it would train with fixed weights, saying nothing)
    eval.code       the values a run would refuse (``CodeEvalOptions.value_problems``), eval files read
    metric_loggers  known names or importable ``_component_`` nodes with valid arguments, their libraries
                    installed, an MLflow tracking server answering (``training/loggers.metric_logger_problems``)

Each section is checked only when it uses mft's own builder (a user's component gets the generic signature
checks) and was not already reported by the schema check; a path that does not exist is left to the path check.
Messages name the config key; ``check_config`` puts the file in front.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch

from mft_components.code_eval.options import CodeEvalOptions
from mft_components.config.core import COMPONENT_KEY, ConfigError, import_object, instantiate, source_of, to_container
from mft_components.config.load import fill_defaults
from mft_components.data.build import build_mft_data, resolve_data_config
from mft_components.data.preference import build_preference_data, resolve_preference_config
from mft_components.data.records import DataError
from mft_components.loss.preference import PreferenceLoss
from mft_components.loss.task_weighted import TaskWeightedLoss
from mft_components.models.attention import AUTO, BACKENDS, resolve_attn_implementation
from mft_components.models.build import build_meta_model, build_model, load_tokenizer
from mft_components.models.liger import liger_kernel_names
from mft_components.training.checkpoint import latest_checkpoint, read_checkpoint_meta
from mft_components.training.loggers import metric_logger_problems
from mft_components.training.resume_check import check_resume as compare_with_checkpoint, run_record

__all__ = ["check_recipe_config", "check_code_eval", "check_metric_loggers", "check_resume", "check_preference"]


def check_recipe_config(cfg: dict, flagged: set[str]) -> list[str]:
    """Every problem of a recipe config beyond its schema, as messages naming the key (empty: none).

    Args:
        cfg: the resolved config (plain dicts).
        flagged: top-level keys the schema check already reported; they are not looked at again.
    """
    problems: list[str] = []
    for key, value in cfg.items():  # inf / nan anywhere (lr=.inf passed every ">= 0" check and trained NaN)
        found = [] if key in flagged else _non_finite(value, key)
        problems += found
        flagged = flagged | ({key} if found else set())
    sections = {key: value for key, value in cfg.items() if key not in flagged}
    _check_output_dir(sections.get("output_dir"), problems)
    _check_optimizer(sections, problems)
    _check_model(sections, problems)
    tokenizer = _load_tokenizer(sections.get("tokenizer"), problems)
    tasks = _check_data(sections.get("data"), tokenizer, problems)
    _check_loss(sections.get("loss"), tasks, problems)
    _check_coba_has_validation(sections.get("loss"), sections.get("data"), problems)
    return problems


# ------------------------------------------------------------------------------------------------- helpers


def _builder_args(node: Any, builder: Callable) -> dict | None:
    """The node's arguments with ``builder``'s defaults filled in, when the node builds with ``builder``."""
    if not isinstance(node, dict) or COMPONENT_KEY not in node:
        return None
    try:
        if import_object(node[COMPONENT_KEY]) is not builder:
            return None
    except (ConfigError, ImportError):
        return None  # reported by the signature check
    args = {name: p.default for name, p in inspect.signature(builder).parameters.items() if p.default is not p.empty}
    args.update((k, v) for k, v in node.items() if k != COMPONENT_KEY)
    return args


def _exists(*paths: Any) -> bool:
    """All paths are strings naming something that exists (a missing one is the path check's message)."""
    return all(isinstance(p, str) and Path(os.path.expanduser(p)).exists() for p in paths)


def _non_finite(value: Any, path: str) -> list[str]:
    """A message per inf or nan number in ``value`` (nested mappings and lists), naming its key."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"'{path}' is {value!r}: expected a finite number"]
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in _non_finite(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [m for i, v in enumerate(value) for m in _non_finite(v, f"{path}[{i}]")]
    return []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------ sections


def _check_output_dir(output_dir: Any, problems: list[str]) -> None:
    if not isinstance(output_dir, str):
        return
    path = Path(os.path.expanduser(output_dir))
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, a file"
        problems.append(f"'output_dir' is {output_dir!r}: it {where}; expected a directory for checkpoints and "
                        "metrics (or a path where one can be made)")


def _check_optimizer(cfg: dict, problems: list[str]) -> None:
    """``lr`` by hand (torch's optimizers take anything for it), then the optimizer and the scheduler built over
    a dummy parameter, so their own argument checks (betas, eps, weight_decay, warmup, min_lr) speak now."""
    node = cfg.get("optimizer")
    if not isinstance(node, dict) or COMPONENT_KEY not in node:
        return
    if "lr" in node and not (_is_number(node["lr"]) and node["lr"] >= 0):  # 0: evaluate without learning
        problems.append(f"'optimizer.lr' is {node['lr']!r}: expected a non-negative number")
        return
    try:
        optimizer = instantiate(node, [torch.nn.Parameter(torch.zeros(1))])
    except ConfigError:
        return  # a signature problem, reported by the schema check
    except (ValueError, TypeError) as e:
        problems.append(f"'optimizer': {node[COMPONENT_KEY]} refuses these settings: {e}")
        return
    scheduler = cfg.get("lr_scheduler")
    if isinstance(scheduler, dict) and COMPONENT_KEY in scheduler:
        steps = cfg.get("max_steps")
        try:
            instantiate(scheduler, optimizer, num_training_steps=steps if isinstance(steps, int) and steps > 0 else 1000)
        except ConfigError:
            pass
        except (ValueError, TypeError) as e:
            problems.append(f"'lr_scheduler': {e}")


def _check_model(cfg: dict, problems: list[str]) -> None:
    args = _builder_args(cfg.get("model"), build_model)
    if args is None:
        return
    attn = args["attn_implementation"]
    if attn != AUTO and attn not in BACKENDS:
        # unknown, or a transformers attention that cannot keep packed samples apart: wrong on any machine (whether
        # a backend runs on the device is the run's business: a config is often checked where it does not run)
        try:
            resolve_attn_implementation(attn, "cpu")
        except ValueError as e:
            problems.append(str(e))
    try:
        liger_kernel_names(args["liger"])
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    if not _exists(args.get("model_dir")):
        return
    dtype = cfg.get("dtype") if cfg.get("dtype") in ("bf16", "fp32") else "bf16"
    try:
        # eager: every architecture has it, and whether a GPU kernel is installed here is not the config's fault
        build_meta_model(args["model_dir"], args["method"], args["lora"], dtype, "eager", args["trust_remote_code"])
    except (ValueError, TypeError, OSError) as e:
        problems.append(str(e))


def _load_tokenizer(node: Any, problems: list[str]):
    """The tokenizer the run would load (None when it is not mft's loader or cannot load)."""
    args = _builder_args(node, load_tokenizer)
    if args is None or not _exists(args.get("path")):
        return None
    try:
        return instantiate(node)
    except Exception as e:  # transformers' loaders raise many types; any of them means the run would stop here
        problems.append(f"'tokenizer.path': cannot load a tokenizer from {args['path']}: {type(e).__name__}: {e}")
        return None


def _check_data(node: Any, tokenizer, problems: list[str]) -> list[str] | None:
    """The task names (None when they cannot be known)."""
    args = _builder_args(node, build_mft_data)
    if args is None:
        return None
    paths = [*(args.get("data_paths") or []), *(args.get("valid_data_paths") or [])]
    if not _exists(*(p.get("path") if isinstance(p, dict) else p for p in paths)):  # {path:, columns:} too
        return None
    wanted = inspect.signature(resolve_data_config).parameters
    try:
        _, tasks, _ = resolve_data_config(tokenizer, **{k: v for k, v in args.items() if k in wanted})
    except DataError as e:
        problems.append(str(e))
        return None
    return list(tasks)


def _check_loss(node: Any, tasks: list[str] | None, problems: list[str]) -> None:
    if _builder_args(node, TaskWeightedLoss) is None:
        return
    try:
        loss = instantiate(node)
        if tasks:
            loss.setup(tasks)
    except ConfigError:
        pass  # a signature problem, reported by the schema check
    except (ValueError, TypeError) as e:
        problems.append(str(e))


def _check_coba_has_validation(loss_node: Any, data_node: Any, problems: list[str]) -> None:
    loss, data = _builder_args(loss_node, TaskWeightedLoss), _builder_args(data_node, build_mft_data)
    if loss is None or data is None or loss.get("mode") != "coba":
        return
    size, ratio = data.get("valid_size"), data.get("valid_ratio")
    held_out = size > 0 if isinstance(size, int) else isinstance(ratio, (int, float)) and ratio > 0
    if not (held_out or data.get("valid_data_paths")):
        problems.append("loss.mode: coba weighs the tasks by their validation-loss curves, but data holds out no "
                        "validation data (data.valid_size / data.valid_ratio 0, no data.valid_data_paths): hold "
                        "some out, or choose another loss.mode")


def check_code_eval(cfg: dict, flagged: set[str]) -> list[str]:
    """``eval.code`` values a run would refuse (ranges, eval sets and their records, k / select_by, interpreter).

    Run even when the schema flagged ``eval`` (a mistyped key there): it looks only at values of the right type.
    """
    section = cfg["eval"].get("code") if isinstance(cfg.get("eval"), dict) else None
    if not isinstance(section, dict):
        return []
    # "'eval.code.top_p' is 2: expected ...", or "'eval.code.tasks.x': path does not exist: ..."
    return [f"'eval.code.{key}'{' ' if problem.startswith('is ') else ': '}{problem}"
            for key, problem in CodeEvalOptions.value_problems(section)]


def check_metric_loggers(cfg: dict, flagged: set[str]) -> list[str]:
    """``metric_loggers``: what would make a logger fail at the start of the run (where it would only warn)."""
    return [] if "metric_loggers" in flagged else metric_logger_problems(cfg.get("metric_loggers"))


def check_resume(cfg: Any, schema: type | None, hash_data: bool = True) -> tuple[list[str], list[str]]:
    """What a run of ``cfg`` would refuse, and change, when it resumes: the checkpoint ``resume`` names (``auto``:
    the newest one in output_dir, its mft_checkpoint.json read, not verified) against the config, as the run
    compares them (``training/resume_check.py``).

    Args:
        cfg: the loaded config (a DictConfig; the schema's defaults are filled into a copy).
        schema: the recipe's schema (None: nothing is compared).
        hash_data: read and hash the data files, to compare their content too.

    Returns:
        (problems, notes): the refusals, and the changes the run would apply, as lines.
    """
    if schema is None:
        return [], []
    try:
        filled = cfg.copy()
        fill_defaults(filled, schema)
        config = to_container(filled)
    except Exception:  # noqa: BLE001 - a config the other checks already found wrong
        return [], []
    resume, output_dir = config.get("resume"), config.get("output_dir")
    if resume == "auto" and isinstance(output_dir, str):
        ckpt = latest_checkpoint(os.path.expanduser(output_dir))
    elif isinstance(resume, str) and resume not in ("none", "null", "no", ""):
        ckpt = Path(os.path.expanduser(resume))
    else:
        ckpt = None
    try:
        meta = read_checkpoint_meta(ckpt) if ckpt is not None else None
    except (OSError, ValueError):
        meta = None  # the run verifies it, and says what is wrong (resume: auto moves it aside)
    if not isinstance(meta, dict):
        return [], []
    check = compare_with_checkpoint(meta, config, run_record(config, hash_data=hash_data))
    head = f"'resume' is {resume!r}: it would continue {ckpt}"
    return ([f"{source_of(cfg)}: {head}, trained with another configuration: {refusal}" for refusal in check.refusals],
            [f"{head} with these changes:", *(f"  {line}" for line in check.change_lines())] if check.changes else [])


def check_preference(cfg: dict, flagged: set[str]) -> list[str]:
    """The preference recipe's sections: ``data`` (``build_preference_data``'s limits and files), ``loss``
    (``PreferenceLoss``'s settings and ``task_weights`` against the tasks), and ``reference``."""
    problems: list[str] = []
    sections = {key: value for key, value in cfg.items() if key not in flagged}
    tasks = None
    args = _builder_args(sections.get("data"), build_preference_data)
    if args is not None and _exists(*(args.get("data_paths") or []), *(args.get("valid_data_paths") or [])):
        tokenizer = _load_tokenizer(sections.get("tokenizer"), [])
        wanted = inspect.signature(resolve_preference_config).parameters.keys() | set(
            inspect.signature(resolve_data_config).parameters) | {"seq_len"}
        try:
            _, found, _ = resolve_preference_config(tokenizer, **{k: v for k, v in args.items()
                                                                  if k in wanted and k not in ("tokenizer",)})
            tasks = list(found)
        except DataError as e:
            problems.append(str(e))
    loss = sections.get("loss")
    if _builder_args(loss, PreferenceLoss) is not None:
        try:
            built = instantiate(loss)
            if tasks:
                built.setup(tasks)
            if sections.get("reference") == "precompute" and not built.needs_reference:
                problems.append(f"'reference' is precompute, but loss.preference {built.preference} uses no "
                                "reference model; remove it")
        except ConfigError:
            pass
        except (ValueError, TypeError) as e:
            problems.append(str(e))
    return problems
