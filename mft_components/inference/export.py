"""Export a training checkpoint as a Hugging Face model directory and a PEFT adapter (`mft export`).

A LoRA / QLoRA checkpoint is merged into the ORIGINAL base weights (read from the base model's safetensors, never
from an NF4 copy, so a QLoRA export carries no quantisation error on the weights that were not trained)::

    W_out = cast(W_base.float() + scale * B.float() @ A.float(), dtype)     scale = alpha / r  (rsLoRA: alpha / sqrt(r))

A full fine-tuning checkpoint is re-cast and re-sharded into the same layout. Any PEFT LoRA adapter (MFTCoder's,
or anyone's) is merged onto its base the same way: ``mft export --adapter ADAPTER_DIR --base MODEL_DIR`` (the job
of MFTCoder's ``merge_base_and_lora_to_hf.py``). ``--dtype auto`` (the default) keeps each tensor's dtype, as
``transformers`` saves a model: an fp32 base exports as fp32. The output directory::

    OUT/
      config.json  generation_config.json          (eos_token_id = the EOS the training used)
      model.safetensors | model-0000k-of-0000n.safetensors + model.safetensors.index.json
      tokenizer files                              (chat_template renders exactly the training format)
      mft_chat_format.json                         (the ChatFormat dict; `mft generate` builds prompts from it)
      README.md                                    (model card: base, method, tasks, steps, validation losses)
      adapter/                                     (LoRA / QLoRA only: PEFT adapter_config.json + adapter_model.safetensors)

``--gguf`` / ``--ollama`` add a GGUF file and an Ollama Modelfile made by llama.cpp's own converter (``gguf.py``).
Weights are streamed tensor by tensor (``shards.py``); the adapter is read and merged by ``adapters.py``. Safety of the output: ``OUT`` must not be, or contain, the current directory, the checkpoint, the base model, the
tokenizer or the training data (paths resolved, symlinks followed); ``--force`` replaces only an earlier export
(a directory holding ``mft_chat_format.json``), never other files. Everything is written into a hidden sibling
``.OUT.mft-export-tmp-*`` and swapped in only once complete (the old export is renamed aside, the new one renamed
into place, then the old one deleted), so an interrupted export leaves the previous output whole. Each temporary
sibling holds a ``.mft-export-partial`` file with its process id; the next export to ``OUT`` removes those of
processes that are gone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mft_components.data.templates import ChatFormat
from mft_components.device import disk_full
from mft_components.inference.adapters import (
    ExportError,
    LoRAAdapter,
    adapter_weights_file,
    merge_planned,
    merge_lora_tensor,
    plan_param_merges,
    read_adapter,
    read_adapter_tensors,
)
from mft_components.inference.export_args import add_arguments
from mft_components.inference.gguf import convert_after_export, convert_export_dir
from mft_components.models.expert_lora import ExpertLayout
from mft_components.inference.shards import (
    DTYPE_NAMES,
    OUTPUT_DTYPES,
    TensorSpec,
    main_dtype,
    parse_size,
    read_specs,
    write_sharded_weights,
)
from mft_components.inference.tokenizer_files import save_tokenizer
from mft_components.models.weights import safetensors_files
from mft_components.training.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointError,
    latest_checkpoint,
    mkdtemp_umask,
    verify_checkpoint,
)
from mft_components.training.checkpoint import META_FILE as CHECKPOINT_META

__all__ = ["CHAT_FORMAT_FILE", "ExportError", "checkpoint_to_export", "read_validated_meta", "remove_export_leftovers", "remote_code_refused",
           "model_card", "export_checkpoint", "export_adapter", "add_arguments", "run"]

CHAT_FORMAT_FILE = "mft_chat_format.json"
_PARTIAL_MARK = ".mft-export-partial"  # in a temporary sibling while it is being written: the writer's process id


def checkpoint_to_export(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else the newest ``step_N`` checkpoint of the run directory it names
    (by step, as resume picks; ``mft export outputs/my_run``). Raises ExportError when a run holds none."""
    path = Path(path)
    if (path / CHECKPOINT_META).is_file() or not path.is_dir():
        return path  # read_validated_meta says what is wrong with it
    newest = latest_checkpoint(path, resumable=False)
    if newest is None:
        raise ExportError(f"{path} is neither a training checkpoint (output_dir/step_N/ with {CHECKPOINT_META}) nor "
                          f"a run's output_dir holding one")
    return newest


def read_validated_meta(checkpoint_dir: str | Path) -> dict:
    """Read `mft_checkpoint.json` of a training checkpoint.

    Args:
        checkpoint_dir: a `output_dir/step_N/` directory written by the recipes.

    Returns:
        The metadata dict (method, base_model_dir, chat_format, eos_token, task_names, ...).

    Raises:
        ExportError: the directory or its metadata file is missing or malformed, or a file of the checkpoint does
            not match its consistency record (``checkpoint.verify_checkpoint``).
    """
    path = Path(checkpoint_dir) / CHECKPOINT_META
    if not Path(checkpoint_dir).is_dir():
        raise ExportError(f"checkpoint directory {checkpoint_dir} does not exist (expected output_dir/step_N/)")
    if not path.is_file():
        raise ExportError(f"{path}: not found; {checkpoint_dir} is not an mft training checkpoint (expected "
                          f"output_dir/step_N/ with {CHECKPOINT_META})")
    try:
        meta = verify_checkpoint(checkpoint_dir)
    except CheckpointError as e:
        raise ExportError(f"damaged checkpoint: {e}") from e
    if meta.get("method") not in ("lora", "qlora", "full"):
        raise ExportError(f"{path}: method: expected 'lora', 'qlora' or 'full', got {meta.get('method')!r}")
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def _resolve_base(checkpoint_dir: Path, meta: dict, base: str | Path | None) -> Path:
    if base is not None:
        source, path = "--base", Path(base)
    else:
        if not meta.get("base_model_dir"):
            raise ExportError(f"{checkpoint_dir / CHECKPOINT_META}: base_model_dir is empty; pass the base model "
                              f"directory with --base")
        source, path = f"{checkpoint_dir / CHECKPOINT_META}: base_model_dir", Path(meta["base_model_dir"])
    if not path.is_dir():
        raise ExportError(f"base model directory {path} (from {source}) does not exist; pass the directory of the "
                          f"model the checkpoint was trained from with --base")
    if not (path / "config.json").is_file():
        raise ExportError(f"base model directory {path} (from {source}) has no config.json; expected a Hugging Face "
                          f"model directory")
    return path


def _protected_paths(checkpoint_dir: Path, meta: dict, base_dir: Path | None, tokenizer_dir: Path | None
                     ) -> list[tuple[str, Path]]:
    """What an export must never replace: the current directory, its inputs, and the training data (from the
    checkpoint's config) -- each with a name for the message."""
    config = meta.get("config") or {}
    data = config.get("data") or {}
    entries = [p for key in ("data_paths", "valid_data_paths") for p in (data.get(key) or [])]
    data_paths = [p for p in (e.get("path") if isinstance(e, dict) else e for e in entries) if isinstance(p, str)]
    tokenizer_path = (config.get("tokenizer") or {}).get("path")
    try:
        out = [("the current directory", Path.cwd())]
    except FileNotFoundError:  # the shell's directory was deleted: nothing there to protect
        out = []
    out += [("the checkpoint", checkpoint_dir)]
    out += [("the tokenizer", tokenizer_dir)] if tokenizer_dir is not None else []
    out += [("the base model", base_dir)] if base_dir is not None else []
    out += [("the training tokenizer", Path(tokenizer_path))] if isinstance(tokenizer_path, str) else []
    out += [("the training data", Path(p)) for p in data_paths]
    return out


def _check_output_dir(output_dir: Path, force: bool, protected: list[tuple[str, Path]],
                      checkpoint: Path | None = None) -> Path:
    """The resolved output directory, after refusing every output that would delete what export did not write.

    Args:
        checkpoint: a training checkpoint, which the output must not be inside either: ``saving_limit`` deletes
            and a damaged-checkpoint resume renames a ``step_N`` directory as a whole, export and all.

    Raises:
        ExportError: the output is or contains a protected path, lies inside ``checkpoint``, is a file, or is a
            non-empty directory that is not an earlier export (or is one, without ``force``).
    """
    out = output_dir.expanduser().resolve()
    for what, path in protected:
        path = path.expanduser().resolve()
        if out == path or out in path.parents:
            relation = "is" if out == path else "contains"
            raise ExportError(f"--output {output_dir} ({out}) {relation} {what} ({path}); an export replaces its output "
                              f"directory as a whole, so choose a new directory for it")
    if checkpoint is not None and checkpoint.expanduser().resolve() in out.parents:
        raise ExportError(f"--output {output_dir} ({out}) is inside the checkpoint {checkpoint}, which a run deletes "
                          f"(saving_limit) or renames (resume after damage) as a whole; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--output {output_dir} exists and is not a directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not _is_export(out):
        raise ExportError(f"--output {output_dir} holds files that mft export did not write (e.g. {entries[0].name}); "
                          f"export never deletes those, even with --force (it replaces only an earlier export, "
                          f"a directory with {CHAT_FORMAT_FILE}): choose another --output")
    if entries and not force:
        raise ExportError(f"--output {output_dir} holds an earlier export and is not empty; choose another --output "
                          f"or pass --force to replace it")
    return out


def _is_export(directory: Path) -> bool:
    return (directory / CHAT_FORMAT_FILE).is_file() or (directory / "adapter" / CHAT_FORMAT_FILE).is_file()


def _sibling(out: Path, kind: str) -> Path:
    """A new hidden ``.OUT.mft-export-KIND-*`` directory beside ``out``, marked with this process's id."""
    path = mkdtemp_umask(prefix=f".{out.name}.mft-export-{kind}-", dir=out.parent)
    (path / _PARTIAL_MARK).write_text(f"{os.getpid()}\n")
    return path


def remove_export_leftovers(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` that interrupted exports left: only directories named
    ``.OUT.mft-export-{tmp,old}-*`` holding a ``.mft-export-partial`` file whose process is gone. An earlier
    export set aside by a swap that was killed before the new one took its place goes back to ``out`` first.

    Returns:
        The directories removed.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.mft-export-(tmp|old)-")
    removed = []
    for p in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        if pattern.match(p.name) and p.is_dir() and not p.is_symlink() and (p / _PARTIAL_MARK).is_file():
            try:
                pid = int((p / _PARTIAL_MARK).read_text().strip())
            except (OSError, ValueError):
                continue
            if not _process_alive(pid):
                if not out.exists() and (p / "previous").is_dir():
                    os.replace(p / "previous", out)
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _find_tokenizer_dir(checkpoint_dir: Path, meta: dict, base_dir: Path | None) -> Path:
    # The training config's tokenizer path first (it may differ from the model dir), then the checkpoint (full
    # checkpoints carry tokenizer files), then the base model.
    trained_with = ((meta.get("config") or {}).get("tokenizer") or {}).get("path")
    candidates = [Path(p) for p in (meta.get("tokenizer_dir"), trained_with) if p] + [checkpoint_dir]
    candidates += [base_dir] if base_dir is not None else []
    for c in candidates:
        if (c / "tokenizer_config.json").is_file() or (c / "tokenizer.json").is_file():
            return c
    raise ExportError(f"no tokenizer found in {', '.join(map(str, candidates))} (expected tokenizer_config.json); "
                      f"pass --base with the model directory that holds the tokenizer")


def _load_tokenizer(tokenizer_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ExportError(remote_code_refused(tokenizer_dir, "tokenizer")) from e
        raise


def remote_code_refused(directory: Path, what: str) -> str:
    """The message for a model or tokenizer directory that ships Python code and was not trusted."""
    return (f"{directory}: the {what} ships its own Python code (auto_map in its config), which mft runs only when "
            f"you pass --trust-remote-code; read that code first, it runs with your permissions")


def _token_id(tokenizer, token: str) -> int:
    """The id of the training EOS token; it must be a single vocabulary entry."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ExportError(f"training EOS token {token!r} (mft_checkpoint.json: eos_token) is not in the tokenizer's "
                          f"vocabulary; was the checkpoint trained with another tokenizer?")
    return tid


def _write_configs(out_dir: Path, config_dir: Path, base_dir: Path | None, dtype: torch.dtype, eos_id: int) -> None:
    config = json.loads((config_dir / "config.json").read_text())
    config["dtype"] = DTYPE_NAMES[dtype]
    if "torch_dtype" in config:  # older transformers read this key
        config["torch_dtype"] = DTYPE_NAMES[dtype]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen_path = next((d / "generation_config.json" for d in (config_dir, base_dir)
                     if d is not None and (d / "generation_config.json").is_file()), None)
    gen = json.loads(gen_path.read_text()) if gen_path else {
        k: config[k] for k in ("bos_token_id", "pad_token_id") if config.get(k) is not None}
    # Generation must stop where training taught the model to stop.
    gen["eos_token_id"] = eos_id
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    # Models with remote code need their modelling files next to config.json.
    for d in dict.fromkeys(x for x in (config_dir, base_dir) if x is not None):
        for py in d.glob("*.py"):
            if not (out_dir / py.name).exists():
                shutil.copyfile(py, out_dir / py.name)


def _write_adapter(adapter_out: Path, checkpoint_dir: Path, base_dir: Path, chat_meta: dict) -> None:
    adapter_out.mkdir(parents=True)
    config = json.loads((checkpoint_dir / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(base_dir.resolve())
    (adapter_out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    weights = adapter_weights_file(checkpoint_dir)
    if weights.name == ADAPTER_WEIGHTS:
        shutil.copyfile(weights, adapter_out / ADAPTER_WEIGHTS)
    else:  # an older adapter_model.bin: the export's adapter is safetensors, as peft writes it today
        save_file({k: t.contiguous() for k, t in read_adapter_tensors(weights).items()},
                  str(adapter_out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (adapter_out / CHAT_FORMAT_FILE).write_text(json.dumps(chat_meta, indent=2) + "\n")


def model_card(meta: dict, base_name: str, adapter_only: bool = False) -> str:
    """A short README.md: base model, method, tasks with sample counts, steps, per-task validation loss."""
    method = {"lora": "LoRA", "qlora": "QLoRA", "full": "full-parameter"}[meta["method"]]
    made_by = (f"The PEFT adapter `{meta['adapter_dir']}` merged onto its base with `mft export --adapter`."
               if meta.get("adapter_dir") else f"Fine-tuned with mft ({method} multi-task fine-tuning, MFTCoder-style).")
    lines = [f"# Multi-task fine-tune of {base_name}", "", made_by, "",
             f"- Base model: `{base_name}`", f"- Method: {method}"]
    if meta.get("lora") and meta["method"] != "full":
        lo = meta["lora"]
        lines.append("- LoRA: " + ", ".join(f"{k}={lo[k]}" for k in ("rank", "alpha", "dropout", "use_rslora",
                                                                       "target_modules") if k in lo))
    lines.append(f"- Training steps: {meta.get('step', 'unknown')}")
    valid_step = meta.get("valid_step")
    at = f" (at step {valid_step})" if valid_step is not None and valid_step != meta.get("step") else ""
    lines += ["", "## Tasks", "", f"| task | training samples | validation loss{at} |", "|---|---:|---:|"]
    counts, losses = meta.get("task_sample_counts") or {}, meta.get("valid_losses") or {}
    for t in meta.get("task_names") or sorted(set(counts) | set(losses)):
        loss = losses.get(t)
        lines.append(f"| {t} | {counts.get(t, '')} | {'' if loss is None else f'{loss:.4f}'} |")
    lines += ["", "## Prompt format", "",
              "The tokenizer's `chat_template` renders exactly the training format; use "
              "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` or `mft generate`."]
    if adapter_only:
        lines += ["", "This directory holds a PEFT adapter: `PeftModel.from_pretrained(base_model, adapter_dir)`."]
    elif meta["method"] != "full":
        lines += ["", "`adapter/` holds the PEFT adapter: `PeftModel.from_pretrained(base_model, 'adapter')`."]
    return "\n".join(lines) + "\n"


def export_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path, base: str | Path | None = None,
                      dtype: str = "auto", max_shard_size: int | str = "5GB", adapter_only: bool = False,
                      force: bool = False, meta: dict | None = None, trust_remote_code: bool = False) -> Path:
    """Export a training checkpoint as a Hugging Face model directory (and a PEFT adapter for LoRA / QLoRA).

    Args:
        checkpoint_dir: `output_dir/step_N/` written by a recipe (holds `mft_checkpoint.json`).
        output_dir: directory to create; see the module docstring for its layout.
        base: the base model directory; default `base_model_dir` from the checkpoint metadata.
        dtype: "auto" (each tensor keeps the dtype of the weights it comes from: the base for LoRA / QLoRA, the
            checkpoint for full) | "bf16" | "fp16" | "fp32" for the written weights (the merge runs in float32).
        max_shard_size: largest safetensors file, e.g. "5GB" (one file when the model fits).
        adapter_only: write only `output_dir/adapter/` (LoRA / QLoRA checkpoints).
        force: replace `output_dir` when it holds an earlier export.
        meta: the checkpoint metadata, for a directory without `mft_checkpoint.json` (`export_adapter`).
        trust_remote_code: let `transformers` run Python code shipped with the tokenizer (never asked).

    Returns:
        The output directory (resolved).

    Raises:
        ExportError: missing or damaged checkpoint/base/tokenizer, NaN/inf weights, shape mismatch with the base
            (names the tensor and both shapes), an output that is or contains an input, the current directory or
            the data, a non-empty output that is not an earlier export (or is, without `force`), `adapter_only`
            for a full checkpoint, bad dtype/size, untrusted remote code.
    """
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if dtype not in OUTPUT_DTYPES:
        raise ExportError(f"--dtype: expected one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    out_dtype = OUTPUT_DTYPES[dtype]
    parse_size(max_shard_size)  # fail before any work
    meta = meta if meta is not None else read_validated_meta(checkpoint_dir)
    full = meta["method"] == "full"
    if adapter_only and full:
        raise ExportError(f"--adapter-only: {checkpoint_dir} is a full fine-tuning checkpoint, it has no adapter")
    # A full checkpoint is self-contained; the base is only needed there for the tokenizer, and only when given.
    base_dir = _resolve_base(checkpoint_dir, meta, base) if not full or base is not None else None
    try:
        tokenizer_dir = _find_tokenizer_dir(checkpoint_dir, meta, base_dir)
    except ExportError:  # reported once the weights are known to fit (a wrong --base is the likelier mistake)
        tokenizer_dir = None
    # First, so that an earlier export an interrupted swap set aside is back in place when --output is checked.
    for leftover in remove_export_leftovers(output_dir.expanduser().resolve()):
        print(f"mft export: removed {leftover.name}, left by an interrupted export", file=sys.stderr)
    output_dir = _check_output_dir(output_dir, force, _protected_paths(checkpoint_dir, meta, base_dir, tokenizer_dir),
                                   checkpoint=checkpoint_dir if (checkpoint_dir / CHECKPOINT_META).is_file() else None)

    chat_format = ChatFormat.from_config(meta.get("chat_format"))
    base_name = str(base) if base is not None else str(meta.get("base_model_dir") or "unknown base model")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(output_dir, "tmp")
    needed = 0  # bytes of the weights to write, once known
    try:
        if full:
            weights_dir, transform = checkpoint_dir, (lambda spec, t: t)
        else:
            adapter = read_adapter(checkpoint_dir)
            weights_dir = base_dir
            by_weight = {f"{path}.weight": ab for path, ab in adapter.pairs.items()}

            def transform(spec, t):
                if spec.name in adapter.replaced:  # a bias or module the adapter trained in place of the base's
                    return adapter.replaced[spec.name]
                if spec.name in param_plan:  # fused MoE experts / router (expert_lora)
                    return merge_planned(t, param_plan[spec.name], adapter.scale, f"{spec.name} (from {spec.file})")
                if spec.name not in by_weight:
                    return t
                a, b = by_weight[spec.name]
                return merge_lora_tensor(t, a, b, adapter.scale, f"{spec.name} (from {spec.file})",
                                         adapter.fan_in_fan_out)

        try:
            files = safetensors_files(Path(weights_dir))
        except FileNotFoundError as e:
            raise ExportError(str(e)) from e
        specs = read_specs(files, out_dtype)
        needed = sum(spec.nbytes for spec in specs)
        if not full:
            param_plan = _plan_param_merges(adapter, specs, weights_dir)
            _check_adapter_against_base(adapter, specs, weights_dir)

        tokenizer = _load_tokenizer(tokenizer_dir or _find_tokenizer_dir(checkpoint_dir, meta, base_dir),
                                    trust_remote_code)
        eos_token = meta.get("eos_token") or tokenizer.eos_token
        eos_id = _token_id(tokenizer, eos_token)
        chat_meta = {"chat_format": chat_format.to_dict(), "eos_token": eos_token}
        if adapter_only:
            _write_adapter(tmp / "adapter", checkpoint_dir, base_dir, chat_meta)
            (tmp / "adapter" / "README.md").write_text(model_card(meta, base_name, adapter_only=True))
        else:
            write_sharded_weights(tmp, specs, max_shard_size, transform)
            # The training template becomes the model's chat template: apply_chat_template == training prompt,
            # and the saved tokenizer must give the training ids (checked on samples).
            save_tokenizer(tokenizer, tokenizer_dir or _find_tokenizer_dir(checkpoint_dir, meta, base_dir), tmp,
                           chat_format, trust_remote_code)
            _copy_sentencepiece_model(tokenizer_dir or _find_tokenizer_dir(checkpoint_dir, meta, base_dir), tmp)
            _write_configs(tmp, checkpoint_dir if full else base_dir, base_dir, out_dtype or main_dtype(specs), eos_id)
            (tmp / CHAT_FORMAT_FILE).write_text(json.dumps(chat_meta, indent=2) + "\n")
            (tmp / "README.md").write_text(model_card(meta, base_name))
            if not full:
                _write_adapter(tmp / "adapter", checkpoint_dir, base_dir, chat_meta)
        _swap_in(tmp, output_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full_disk = disk_full(e, "the export", output_dir.parent, needed)
        if full_disk is not None:
            raise ExportError(str(full_disk)) from e
        raise
    return output_dir


def _copy_sentencepiece_model(tokenizer_dir: Path, out: Path) -> None:
    # transformers saves a sentencepiece tokenizer as tokenizer.json only; llama.cpp's converter reads the
    # original tokenizer.model (Gemma's needs it), so it travels with the export unchanged.
    if (tokenizer_dir / "tokenizer.model").is_file() and not (out / "tokenizer.model").exists():
        shutil.copyfile(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")


def _swap_in(new: Path, out: Path) -> None:
    """Put the complete export ``new`` (still marked partial) at ``out``: an earlier export is renamed aside first
    and deleted only once ``new`` is in place. A kill between the two renames leaves two marked siblings: the next
    export puts the earlier export back at ``out`` and removes the unfinished swap's copy."""
    if out.is_dir() and any(out.iterdir()):
        old = _sibling(out, "old")
        os.replace(out, old / "previous")
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)  # nothing there, or an empty directory (rename replaces it)
    (out / _PARTIAL_MARK).unlink()


def _plan_param_merges(adapter: LoRAAdapter, specs: list[TensorSpec], base_dir: Path) -> dict:
    """Fused MoE experts / routers (``adapters.plan_param_merges``); the base's layout is read only when needed."""
    shapes = {s.name: s.shape for s in specs}
    if not adapter.params and all(f"{path}.weight" in shapes for path in adapter.pairs):
        return {}
    return plan_param_merges(adapter, shapes, ExpertLayout(base_dir))


def _check_adapter_against_base(adapter: LoRAAdapter, specs: list[TensorSpec], base_dir: Path) -> None:
    """Every adapted module exists in the base with the shape the adapter expects (headers only, before writing)."""
    shapes = {s.name: s.shape for s in specs}
    for name, tensor in adapter.replaced.items():
        if shapes.get(name) != tuple(tensor.shape):
            found = f"has {shapes[name]}" if name in shapes else "has no such tensor"
            raise ExportError(f"the adapter holds {name} {tuple(tensor.shape)}, but the base model in {base_dir} "
                              f"{found}; was it trained on another base model? Pass the right one with --base")
    for path, (a, b) in adapter.pairs.items():
        name = f"{path}.weight"
        if name not in shapes:
            raise ExportError(f"the adapter targets {path}, but the base model in {base_dir} has no tensor {name}; was "
                              f"this checkpoint trained on another base model? Pass the right one with --base")
        expected = (a.shape[1], b.shape[0]) if adapter.fan_in_fan_out else (b.shape[0], a.shape[1])
        if shapes[name] != expected:
            raise ExportError(f"shape mismatch for {name}: the base model in {base_dir} has {shapes[name]}, the "
                              f"adapter expects {expected} (lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)}); was "
                              f"this checkpoint trained on another base model? Pass the right one with --base")


def export_adapter(adapter_dir: str | Path, base: str | Path, output_dir: str | Path, template: str | None = None,
                   **kwargs) -> Path:
    """Merge a PEFT LoRA adapter (MFTCoder's, or anyone's) onto its base and write a Hugging Face model directory.

    The adapter directory holds `adapter_config.json` and `adapter_model.safetensors` as `peft` saves them; what
    the merge cannot reproduce exactly is refused (see `read_adapter`). The written `chat_template` is the
    adapter's training format: the one in its `mft_chat_format.json` when mft exported it, else `template`
    (default `mft`, MFTCoder's format, which MFTCoder's merge script writes too).

    Args:
        adapter_dir: the PEFT adapter directory.
        base: the base model directory the adapter was trained on.
        output_dir: directory to create.
        template: ChatFormat template of the exported `chat_template` (`mft`, `mftcoder_atorch`, `hf`).
        **kwargs: `export_checkpoint`'s dtype, max_shard_size, adapter_only, force.

    Raises:
        ExportError: as `export_checkpoint`, plus a missing adapter or base directory.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ExportError(f"--adapter {adapter_dir}: no such directory (expected a PEFT adapter directory with "
                          f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    saved = adapter_dir / CHAT_FORMAT_FILE
    try:
        chat = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() and template is None else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{saved}: not valid JSON ({e}); the file is damaged (or pass --template)") from e
    if not isinstance(chat, dict):
        raise ExportError(f"{saved}: expected a JSON object (or pass --template)")
    try:
        chat_format = ChatFormat.from_config(chat.get("chat_format") or {"template": template or "mft"})
    except ValueError as e:
        raise ExportError(f"--template: {e}") from None
    meta = {"method": "lora", "base_model_dir": str(base), "adapter_dir": str(adapter_dir),
            "chat_format": chat_format.to_dict(), "eos_token": chat.get("eos_token")}
    return export_checkpoint(adapter_dir, output_dir, base=base, meta=meta, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run `mft export`; returns the exit status (errors for people go to stderr, status 2)."""
    options = dict(dtype=args.dtype, max_shard_size=args.max_shard_size, adapter_only=args.adapter_only,
                   force=args.force, trust_remote_code=args.trust_remote_code)
    try:
        if convert_export_dir(args):
            return 0
        if args.output is None:
            raise ExportError("--output OUT_DIR is required (only --gguf / --ollama on an export directory go "
                              "without it: they add to that directory)")
        if (args.adapter is None) == (args.checkpoint_dir is None):
            raise ExportError("give either a CHECKPOINT_DIR or --adapter ADAPTER_DIR (with --base MODEL_DIR)")
        if args.adapter is not None:
            if args.base is None:
                raise ExportError("--adapter needs --base MODEL_DIR, the model the adapter was trained on")
            out = export_adapter(args.adapter, args.base, args.output, template=args.template, **options)
        else:
            if args.template is not None:
                raise ExportError("--template is for --adapter; a checkpoint exports the format it was trained with")
            checkpoint = checkpoint_to_export(args.checkpoint_dir)
            if checkpoint != Path(args.checkpoint_dir):
                print(f"mft export: the newest checkpoint in {args.checkpoint_dir}: {checkpoint.name}")
            out = export_checkpoint(checkpoint, args.output, base=args.base, **options)
        what = "PEFT adapter" if args.adapter_only else "Hugging Face model"
        print(f"mft export: wrote {what} to {out}")
        convert_after_export(args, out)
    except ExportError as e:
        print(f"mft export: error: {e}", file=sys.stderr)
        return 2
    return 0
