"""Checkpoints: safetensors weights that other tools read, plus the recipe state for an exact resume.

A checkpoint is one directory ``output_dir/step_N/``::

    step_N/
      adapter_model.safetensors   LoRA / QLoRA: the adapter, PEFT key names  ┐ loadable by `peft` /
      adapter_config.json         PEFT's adapter config                      ┘ `transformers` as they are
      model.safetensors           full: HF weights (or model-0000k-of-0000n.safetensors + index)
      config.json                 full: the HF model config (+ tokenizer files copied from the base model)
      mft_checkpoint.json         method, base model, chat format, EOS, task names, step, validation losses,
                                  and the consistency record: size and sha256 of every other file
      recipe_state.pt             optimizer, scheduler, data loader + RNG per rank, step, best, patience, CoBa

Atomicity: everything is written into ``step_N.tmp-XXXX`` (files fsynced), which is then renamed to ``step_N``.
A rename within one directory is atomic, so a kill at any moment leaves either no ``step_N`` or a whole one; the
``.tmp-`` leftovers of a killed save are ignored by :func:`list_checkpoints` and removed by
:func:`remove_partial_checkpoints`. ``recipe_state.pt`` holds only tensors, numbers, strings and containers, so
it loads with ``torch.load(weights_only=True)`` (no pickled code runs on resume).

Consistency: :func:`verify_checkpoint` is the one reader that resume and ``mft export`` use. It checks the record
(a truncated, garbage or swapped file, e.g. a ``recipe_state.pt`` from another step, is named with what is wrong)
and that the step in ``mft_checkpoint.json`` is the directory's; ``resume: auto`` moves a damaged checkpoint aside
(``step_N.damaged``) and continues from the newest intact one.

The recipe gathers what is sharded on every rank (the weights: ``models/parallelize.gather_state_dict``; the recipe
state: ``state.gather_training_state``) and calls :func:`save_checkpoint` on rank 0 only.
"""

from __future__ import annotations

import json
import os
import sys
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from safetensors.torch import load_file, save_file

from mft_components.assets.cache import file_sha256
from mft_components.device import disk_full, tensor_bytes
from mft_components.distributed import decided_by_rank0
from mft_components.models.lora import hf_key, peft_to_adapter_state_dict

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "META_FILE", "STATE_FILE", "CheckpointError", "ResumeError",
           "save_checkpoint", "mkdtemp_umask", "list_checkpoints", "latest_checkpoint", "resolve_resume",
           "prune_checkpoints", "remove_partial_checkpoints", "read_checkpoint_meta", "verify_checkpoint",
           "load_recipe_state", "load_checkpoint_weights", "load_safetensors", "checkpoint_meta", "load_adapter"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
META_FILE = "mft_checkpoint.json"
STATE_FILE = "recipe_state.pt"
FULL_WEIGHTS = "model.safetensors"
FULL_INDEX = "model.safetensors.index.json"
# Copied next to full weights so that the checkpoint is a loadable HF model directory on its own.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
)
_STEP_DIR = re.compile(r"^step_(\d+)$")
RECORD_KEY = "files"  # mft_checkpoint.json: {file name: {"size": bytes, "sha256": hex}} of the other files


# ----------------------------------------------------------------------------------------------- writing


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    meta: dict[str, Any],
    recipe_state: dict[str, Any] | None = None,
    adapter_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    base_model_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``output_dir/step_{step}`` atomically (rank 0 only).

    Args:
        output_dir: the run's output directory.
        step: optimizer step; names the directory.
        weights: adapter weights with PEFT key names (``adapter_config`` given), or full HF weights (``model_config``
            given), as CPU tensors.
        meta: the content of ``mft_checkpoint.json`` (see CONTRACT); ``step`` is filled in.
        recipe_state: what :func:`load_recipe_state` returns on resume; None writes no state (an export-only save).
        adapter_config: PEFT's ``adapter_config.json`` content, for LoRA / QLoRA.
        model_config: HF ``config.json`` content, for full fine-tuning.
        base_model_dir: for full checkpoints, tokenizer files are copied from here.
        max_shard_bytes: full weights above this size are split into HF-style shards with an index.

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: neither or both of ``adapter_config`` and ``model_config`` given.
        DiskFullError: the disk filled (or a quota or file-size limit was hit); nothing is left half-written.
    """
    if (adapter_config is None) == (model_config is None):
        raise ValueError("save_checkpoint: give exactly one of adapter_config (LoRA) or model_config (full)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"step_{step}"
    tmp = mkdtemp_umask(prefix=f"step_{step}.tmp-", dir=output_dir)
    try:
        if adapter_config is not None:
            save_file(_contiguous(weights), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            _write_json(tmp / ADAPTER_CONFIG, adapter_config)
        else:
            _save_full_weights(tmp, weights, model_config, max_shard_bytes)
            _write_json(tmp / "config.json", model_config)
            if base_model_dir is not None:
                for name in TOKENIZER_FILES:
                    if (Path(base_model_dir) / name).is_file():
                        shutil.copy2(Path(base_model_dir) / name, tmp / name)
        if recipe_state is not None:
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save(recipe_state, f)
        # The metadata is written last: a directory with mft_checkpoint.json is a finished one. It carries the
        # consistency record of every file written before it (verify_checkpoint checks it on resume and export).
        _write_json(tmp / META_FILE, {**meta, "step": step, RECORD_KEY: _file_record(tmp)})
        _fsync_dir_files(tmp)
        if final.exists():  # re-saving a step (e.g. the final save after a periodic one at the same step)
            old = Path(tempfile.mkdtemp(prefix=f"step_{step}.old-", dir=output_dir))
            os.replace(final, old / "ckpt")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(output_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, f"checkpoint step_{step}", output_dir, tensor_bytes(weights) + tensor_bytes(recipe_state))
        if full is not None:
            raise full from e
        raise
    return final


def _contiguous(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}


def _save_full_weights(tmp: Path, weights: dict[str, torch.Tensor], model_config: dict, max_shard_bytes: int) -> None:
    weights = _contiguous(weights)
    if model_config.get("tie_word_embeddings") and "lm_head.weight" in weights:
        # HF stores tied embeddings once; safetensors refuses two names for one storage anyway.
        weights.pop("lm_head.weight")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / FULL_WEIGHTS), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    _write_json(tmp / FULL_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _file_record(directory: Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"size", "sha256"}}`` of every file in ``directory`` (the checkpoint's consistency record)."""
    return {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != META_FILE}


def _umask() -> int:
    try:  # Linux names it without changing it (os.umask can only be read by setting it, process-wide)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mkdtemp_umask(prefix: str, dir: str | os.PathLike) -> Path:
    """``tempfile.mkdtemp`` with the permissions ``mkdir`` would give (0777 less the umask), not mkdtemp's 0700:
    checkpoints and exports are written into such a directory and renamed into place, keeping its mode."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(path, 0o777 & ~_umask())
    return path


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_files(directory: Path) -> None:
    # Without fsync a power loss after the rename could leave a renamed directory of empty files.
    for p in directory.iterdir():
        _fsync(p)
    _fsync(directory)


# ---------------------------------------------------------------------------------------- finding, pruning


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished checkpoints in ``output_dir`` as ``(step, path)``, oldest first (``.tmp-`` leftovers excluded)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike, *, resumable: bool = True) -> Path | None:
    """The newest finished checkpoint (with a recipe state when ``resumable``), or None (files not verified)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if not resumable or (path / STATE_FILE).is_file():
            return path
    return None


class ResumeError(ValueError):
    """``resume`` names no resumable checkpoint, or ``output_dir`` holds another run's later checkpoints."""


class CheckpointError(ValueError):
    """A damaged or inconsistent checkpoint; the message names the file and what is wrong with it."""


def resolve_resume(resume: str | os.PathLike | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a run continues from, verified (:func:`verify_checkpoint`).

    Collective under a process group: rank 0 decides (reading every file once, moving damaged checkpoints aside)
    and every rank gets its answer, or its error.

    Args:
        resume: None / ``"none"`` / false (start fresh), ``"auto"`` (the newest intact checkpoint in
            ``output_dir``, or fresh when there is none; damaged newer ones are renamed ``step_N.damaged``, with
            a note on stderr), or a checkpoint directory.
        output_dir: the run's output directory.

    Raises:
        ResumeError: a given path is not a finished, intact checkpoint with a recipe state; ``resume: auto``
            finds only damaged checkpoints; or ``output_dir`` holds checkpoints beyond the one this run starts from.
    """
    # Rank 0 reads every file of the checkpoint; the others wait in step, not in one broadcast.
    return decided_by_rank0(lambda: _resolve_resume(resume, output_dir), errors=(ResumeError,))


def _resolve_resume(resume: str | os.PathLike | None, output_dir: str | os.PathLike) -> Path | None:
    if resume in (None, False, "", "none", "null", "no"):
        _refuse_later_checkpoints(output_dir, after=0, why="this run starts fresh (resume: null)")
        return None
    if resume == "auto":
        return _newest_intact_checkpoint(Path(output_dir))
    path = Path(os.path.expanduser(str(resume)))
    try:
        meta = verify_checkpoint(path, resumable=True)
    except CheckpointError as e:
        raise ResumeError(f"resume: {path} is not a resumable checkpoint: {e}\n(expected an intact output_dir/step_N "
                          f"directory written by a recipe, or resume: auto)") from e
    _refuse_later_checkpoints(output_dir, after=meta["step"], why=f"this run resumes {path}")
    return path


def _newest_intact_checkpoint(output_dir: Path) -> Path | None:
    """``resume: auto``: the newest checkpoint that verifies; damaged newer ones are moved aside, saying so. One
    saved without a recipe state (weights only) is passed over and left where it is, as ``latest_checkpoint`` does."""
    damaged = []
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            damaged.append((path, e))
            continue
        if not (path / STATE_FILE).is_file():  # its record does not list one (verified): whole, not resumable
            continue
        for bad, problem in damaged:
            aside = _move_aside(bad)
            print(f"resume: {bad.name} is damaged: {problem}\n  moved it to {aside.name}; resuming from {path.name}",
                  file=sys.stderr, flush=True)
        return path
    if damaged:
        raise ResumeError(f"resume: auto: no intact checkpoint in {output_dir}:\n  "
                          + "\n  ".join(str(problem) for _, problem in damaged)
                          + f"\nmove them out of {output_dir} to start afresh, or resume from a copy you trust")
    return None


def _move_aside(path: Path) -> Path:
    """Rename a damaged ``step_N`` to ``step_N.damaged`` (``.damaged-2`` ...): kept for a look, no longer a
    checkpoint (``list_checkpoints`` skips it, so pruning and later resumes ignore it)."""
    aside, n = path.with_name(f"{path.name}.damaged"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, aside)
    return aside


def _refuse_later_checkpoints(output_dir: str | os.PathLike, after: int, why: str) -> None:
    """Checkpoints of another run beyond this run's start would count as 'newest': `saving_limit` would delete
    this run's own checkpoints and `resume: auto` would later continue the other run. Refuse instead.

    Raises:
        ResumeError: ``output_dir`` holds checkpoints with a step above ``after``.
    """
    later = [p.name for step, p in list_checkpoints(output_dir) if step > after]
    if later:
        raise ResumeError(
            f"{output_dir} already holds checkpoints {', '.join(later)} and {why}: set resume: auto to continue "
            "them, or use another output_dir (or move them away)"
        )


def prune_checkpoints(output_dir: str | os.PathLike, saving_limit: int | None, keep: tuple[int, ...] = ()) -> list[Path]:
    """Delete all but the ``saving_limit`` newest checkpoints and the steps in ``keep`` (e.g. the best).

    Returns:
        The directories removed. ``saving_limit`` None or <= 0 keeps everything.
    """
    if not saving_limit or saving_limit <= 0:
        return []
    ckpts = list_checkpoints(output_dir)
    newest = {step for step, _ in ckpts[-saving_limit:]}
    removed = []
    for step, path in ckpts:
        if step not in newest and step not in keep:
            # Rename first so a kill during rmtree never leaves a half-deleted step_N that looks finished.
            doomed = path.with_name(f"{path.name}.tmp-delete")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(path)
    return removed


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Clear what killed saves left in ``output_dir``: ``step_N.tmp-*`` / ``step_N.old-*`` directories.

    Call it holding output_dir's lock (``training/output_lock.py``, rank 0 before training): then no live run
    writes there, and every leftover is a dead process's. A re-save of a step (``save_checkpoint``) killed between
    its two renames left the earlier ``step_N`` set aside in ``step_N.old-*/ckpt``, a complete new one in
    ``step_N.tmp-*``, and no ``step_N``: the earlier one is put back (the new one if only it verifies), as
    ``mft export`` puts back an output its swap set aside, and said so on stderr.

    Returns:
        The leftover directories removed.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    leftovers = sorted(p for p in output_dir.iterdir() if _LEFTOVER.match(p.name))
    for step in sorted({int(_LEFTOVER.match(p.name).group(1)) for p in leftovers}):
        final = output_dir / f"step_{step}"
        if final.exists():
            continue
        set_aside = [p / "ckpt" for p in leftovers if p.name.startswith(f"step_{step}.old-")]
        written = [p for p in leftovers if p.name.startswith(f"step_{step}.tmp-") and not p.name.endswith("-delete")]
        for candidate in (*set_aside, *written):  # a pruned step (.tmp-delete) is never put back
            if _intact(candidate, step):
                os.replace(candidate, final)
                print(f"note: {final}: put back the checkpoint that a save killed halfway left in "
                      f"{candidate.relative_to(output_dir)}", file=sys.stderr, flush=True)
                break
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


_LEFTOVER = re.compile(r"^step_(\d+)\.(tmp|old)-")


def _intact(candidate: Path, step: int) -> bool:
    try:
        return candidate.is_dir() and verify_checkpoint(candidate)["step"] == step
    except CheckpointError:
        return False


# ----------------------------------------------------------------------------------------------- reading


def read_checkpoint_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The content of ``mft_checkpoint.json`` (not verified: :func:`verify_checkpoint` for that)."""
    return json.loads((Path(ckpt_dir) / META_FILE).read_text(encoding="utf-8"))


def verify_checkpoint(ckpt_dir: str | os.PathLike, *, resumable: bool = False) -> dict[str, Any]:
    """``mft_checkpoint.json`` of a checkpoint whose files all match its consistency record.

    Checks: the metadata is a readable JSON object; its ``step`` is the directory's (``step_N``); every file of
    the record is there with its size and sha256 (so a truncated, emptied, overwritten, bit-flipped or swapped
    file is caught before anything loads it). A checkpoint written before the record existed is only parsed.

    Args:
        ckpt_dir: a ``step_N`` directory.
        resumable: also require ``recipe_state.pt``.

    Returns:
        The metadata dict.

    Raises:
        CheckpointError: naming the file and what is wrong.
    """
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META_FILE
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing; {ckpt_dir} is not a finished checkpoint written by a recipe")
    try:
        text = meta_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from e
    if not text.strip():
        raise CheckpointError(f"{meta_path}: empty")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}:{e.lineno}: not valid JSON ({e.msg}); truncated or overwritten") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{meta_path}: expected a JSON object with an integer step")
    dir_step = _step_of(ckpt_dir)
    if dir_step is not None and meta["step"] != dir_step:
        raise CheckpointError(f"{meta_path}: says step {meta['step']}, but the directory is {ckpt_dir.name}")
    record = meta.get(RECORD_KEY)
    if resumable and not (ckpt_dir / STATE_FILE).is_file():
        raise CheckpointError(f"{ckpt_dir / STATE_FILE}: missing; the checkpoint cannot be resumed")
    if not isinstance(record, dict):
        return meta  # written before the record existed
    for name, want in record.items():
        path = ckpt_dir / name
        if not (isinstance(want, dict) and isinstance(want.get("size"), int) and isinstance(want.get("sha256"), str)):
            raise CheckpointError(f"{meta_path}: its record entry for {name!r} is {want!r}; expected "
                                  f"{{\"size\": bytes, \"sha256\": hex}} (edited by hand?)")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint's record in {META_FILE} lists it)")
        size = path.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"{path}: {size:,} bytes, the record in {META_FILE} says {want.get('size'):,} "
                                  f"(truncated, emptied or replaced after the checkpoint was written)")
        if file_sha256(path) != want.get("sha256"):
            raise CheckpointError(f"{path}: its content differs from the record in {META_FILE} (sha256): corrupted, "
                                  f"or replaced by another checkpoint's file")
    return meta


def _step_of(ckpt_dir: Path) -> int | None:
    m = _STEP_DIR.match(ckpt_dir.name)
    return int(m.group(1)) if m else None


def load_recipe_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """``recipe_state.pt`` loaded with ``weights_only=True`` onto the CPU.

    Raises:
        CheckpointError: the file cannot be loaded, or holds another step than its ``step_N`` directory.
    """
    path = Path(ckpt_dir) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # EOFError, zip and unpickling errors of a damaged file: all mean the same to a person
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    step = _step_of(Path(ckpt_dir))
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a recipe state (no step)")
    if step is not None and state["step"] != step:
        raise CheckpointError(f"{path}: holds the state of step {state['step']}, but the checkpoint is step_{step}")
    return state


def load_checkpoint_weights(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The saved weights as written: PEFT adapter keys, or full HF keys (all shards).

    Raises:
        CheckpointError: no weights, or a weights file that cannot be read.
    """
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / ADAPTER_WEIGHTS).is_file():
        return load_safetensors(ckpt_dir / ADAPTER_WEIGHTS)
    if (ckpt_dir / FULL_INDEX).is_file():
        try:
            index = json.loads((ckpt_dir / FULL_INDEX).read_text(encoding="utf-8"))
            files = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{ckpt_dir / FULL_INDEX}: not a safetensors index ({e})") from e
        weights = {}
        for file in files:
            weights.update(load_safetensors(ckpt_dir / file))
        return weights
    if (ckpt_dir / FULL_WEIGHTS).is_file():
        return load_safetensors(ckpt_dir / FULL_WEIGHTS)
    raise CheckpointError(f"{ckpt_dir}: no {ADAPTER_WEIGHTS}, {FULL_INDEX} or {FULL_WEIGHTS}")


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, failing with a :class:`CheckpointError` that names the file.

    Raises:
        CheckpointError: missing, truncated or garbage file.
    """
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError ("incomplete metadata", "header too large", ...) or OSError
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


# ------------------------------------------------------------------------------------- metadata, adapters


def checkpoint_meta(model: Any, data: Any, tokenizer: Any, last_eval: tuple[int, Any] | None,
                    config: dict | None = None, base_model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``mft_checkpoint.json`` content (CONTRACT: method, base model, chat format, EOS, tasks, losses, LoRA)."""

    return {
        "method": model.method,
        "base_model_dir": str(base_model_dir or model.model_dir),
        "chat_format": data.chat_format.to_dict(),
        "eos_token": tokenizer.eos_token,
        "task_names": list(data.task_names),
        "task_sample_counts": dict(data.task_sample_counts),
        "valid_losses": dict(last_eval[1].task_loss) if last_eval else {},
        "valid_step": last_eval[0] if last_eval else None,
        "lora": model.lora_config,
        "config": config,
    }


@torch.no_grad()
def load_adapter(model: torch.nn.Module, ckpt_dir: str | os.PathLike) -> None:
    """Copy a checkpoint's PEFT adapter into the (possibly FSDP2-sharded) model's LoRA parameters.

    Every rank reads the file and keeps its own shard.

    Raises:
        ValueError: the checkpoint's adapter and the model's LoRA modules do not match (names or shapes).
    """
    config_path = Path(ckpt_dir) / ADAPTER_CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    saved = peft_to_adapter_state_dict(load_checkpoint_weights(ckpt_dir), config.get("target_parameters"),
                                       config.get("r"))
    seen = set()
    for name, param in model.named_parameters():
        key = hf_key(name)
        if ".lora_a." not in key and ".lora_b." not in key:
            continue
        if key not in saved:
            raise ValueError(f"{ckpt_dir}: the adapter has no {key}; was it trained with other model.lora settings?")
        full = saved[key].to(device=param.device, dtype=param.dtype)
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"{ckpt_dir}: {key} has shape {tuple(full.shape)}, the model expects {tuple(param.shape)}")
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements)
        param.copy_(full)
        seen.add(key)
    unused = sorted(set(saved) - seen)
    if unused:
        raise ValueError(f"{ckpt_dir}: adapter weights {unused[:5]} match no LoRA module of the model")
