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

Weights are streamed tensor by tensor: the shard plan is made from the safetensors headers, then each shard file is
written one tensor at a time, so peak memory is about one tensor in float32, not the model (let alone twice).
Safety of the output: ``OUT`` must not be, or contain, the current directory, the checkpoint, the base model, the
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
import math
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from mft_components.training.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointError, load_safetensors, mkdtemp_umask
from mft_components.training.checkpoint import META_FILE as CHECKPOINT_META
from mft_components.training.checkpoint import verify_checkpoint
from mft_components.models.weights import safetensors_files as _model_safetensors_files

# "auto": every floating tensor keeps the dtype it has in the weights being exported.
OUTPUT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
                torch.float64: "float64"}
# safetensors header dtype codes -> (torch dtype, bytes per element)
_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_TORCH_TO_ST = {v[0]: k for k, v in _ST_DTYPES.items()}
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")
_PEFT_PREFIX = "base_model.model."
# adapter_config.json options whose adapters are not `W + scale * B @ A` on the base weights: refused, with why.
_UNMERGEABLE_OPTIONS = {
    "use_dora": "DoRA rescales each merged weight by a learned magnitude",
    "lora_bias": "lora_B carries a bias",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layer_replication": "layers are replicated",
    "target_parameters": "LoRA on raw parameters (e.g. fused MoE experts)",
    "trainable_token_indices": "trained token embeddings",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA pools its inputs",
    "use_bdlora": "block-diagonal LoRA",
}
# Initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, ...): the adapter is relative to the
# rewritten base, not to the one on disk. These keep the base as it is.
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva")
CHAT_FORMAT_FILE = "mft_chat_format.json"
_PARTIAL_MARK = ".mft-export-partial"  # in a temporary sibling while it is being written: the writer's process id


class ExportError(ValueError):
    """A checkpoint, base model or output directory that cannot be exported; the message says what and where."""


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints and adapters
# ----------------------------------------------------------------------------------------------------------------


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


@dataclass
class LoRAAdapter:
    """A PEFT-format LoRA adapter: per target module its `A [r, in]` and `B [out, r]` and the merge scale.

    ``replaced`` holds whole tensors the adapter trained in place of the base's: biases (PEFT ``bias:
    lora_only | all``, which MFTCoder uses) and ``modules_to_save`` copies, by base tensor name.
    ``fan_in_fan_out``: the targets store their weight as ``[in, out]`` (GPT-2's Conv1D), so the update is transposed.
    """

    config: dict
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path ("model.layers.0.self_attn.q_proj") -> (A, B)
    scale: float
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    fan_in_fan_out: bool = False


def lora_scale(adapter_config: dict) -> float:
    """`alpha / r`, or `alpha / sqrt(r)` for rsLoRA, as PEFT and `LoRALinear` define it."""
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def read_adapter(adapter_dir: str | Path) -> LoRAAdapter:
    """Load `adapter_config.json` + `adapter_model.safetensors` (PEFT key names) from a checkpoint or adapter dir.

    Args:
        adapter_dir: directory holding the two PEFT files.

    Returns:
        LoRAAdapter with tensors as stored (not cast).

    Raises:
        ExportError: a file is missing, unreadable or holds NaN / inf, or the adapter is not a plain LoRA that
            merges as `W + scale * B @ A` (another PEFT type, DoRA, per-module rank/alpha patterns, an init that
            rewrote the base, ...; see `_UNMERGEABLE_OPTIONS`), or it holds tensors that are neither LoRA nor
            trained biases / `modules_to_save`, or A/B do not pair up.
    """
    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ExportError(f"{p}: not found; a LoRA/QLoRA checkpoint holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{cfg_path}: not valid JSON ({e}); the adapter config is damaged") from e
    if not isinstance(config, dict) or not isinstance(config.get("r"), int) or "lora_alpha" not in config:
        raise ExportError(f"{cfg_path}: expected a PEFT LoRA config with r and lora_alpha")
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{cfg_path}: peft_type: {config['peft_type']!r} adapters cannot be merged by mft export; "
                          f"expected 'LORA'")
    for key, why in _UNMERGEABLE_OPTIONS.items():
        if config.get(key):
            raise ExportError(f"{cfg_path}: {key}: {config[key]!r} is not supported by the merge ({why}); merge this "
                              f"adapter with peft's merge_and_unload instead")
    init = config.get("init_lora_weights", True)
    if init not in _BASE_PRESERVING_INITS or config.get("loftq_config"):
        raise ExportError(f"{cfg_path}: init_lora_weights: {init!r} rewrites the base weights at initialisation, so "
                          f"the adapter does not apply to the base on disk; convert it to a plain LoRA with peft "
                          f"(save_pretrained(..., path_initial_model_for_weight_conversion=...)) first")
    # Whole tensors an adapter may carry besides LoRA pairs: trained biases and modules_to_save copies.
    bias_mode = config.get("bias") or "none"
    saved_modules = tuple(config.get("modules_to_save") or ())
    halves: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    try:
        tensors = load_safetensors(w_path)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    for key, tensor in tensors.items():
        _check_finite(tensor, f"{w_path}: tensor {key}", "the adapter is corrupted, or training diverged")
        m = _PEFT_KEY.match(key)
        if m is not None:
            halves.setdefault(m["path"], {})[m["which"]] = tensor
            continue
        # PEFT names a wrapped layer's own parameters `<module>.base_layer.<param>`; the base calls it `<module>.<param>`.
        name = key[len(_PEFT_PREFIX):].replace(".base_layer.", ".") if key.startswith(_PEFT_PREFIX) else None
        module = name.rsplit(".", 1)[0] if name else ""
        if name and ((bias_mode != "none" and name.endswith(".bias"))
                     or any(module == s or module.endswith(f".{s}") for s in saved_modules)):
            replaced[name] = tensor
            continue
        raise ExportError(f"{w_path}: tensor {key!r} is not a LoRA weight "
                          f"(expected base_model.model.<module>.lora_A.weight / .lora_B.weight, or a bias with "
                          f"bias: lora_only/all, or a module listed in modules_to_save)")
    pairs = {}
    for path, h in halves.items():
        if set(h) != {"A", "B"}:
            raise ExportError(f"{w_path}: module {path} has only lora_{''.join(h)}; expected both lora_A and lora_B")
        a, b = h["A"], h["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != config["r"] or b.shape[1] != config["r"]:
            raise ExportError(f"{w_path}: module {path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                              f"match r={config['r']} from {cfg_path} (expected [r, in] and [out, r])")
        pairs[path] = (a, b)
    return LoRAAdapter(config=config, pairs=pairs, scale=lora_scale(config), replaced=replaced,
                       fan_in_fan_out=bool(config.get("fan_in_fan_out")))


def _check_finite(tensor: torch.Tensor, what: str, why: str) -> None:
    """Raise an ExportError when a floating tensor holds NaN or inf; checked in slices of 16M elements, so a large
    embedding costs no tensor-sized temporary."""
    if not tensor.is_floating_point():
        return
    bad = sum(int((~torch.isfinite(part)).sum()) for part in tensor.detach().reshape(-1).split(1 << 24))
    if bad:
        raise ExportError(f"{what} holds {bad:,} NaN/inf value(s) of {tensor.numel():,}; {why}")


def merge_lora_tensor(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, name: str = "weight",
                      fan_in_fan_out: bool = False) -> torch.Tensor:
    """Return `weight + scale * b @ a` in float32 (`weight + scale * (b @ a).T` for an `[in, out]` weight).

    Raises:
        ExportError: shapes do not fit (the adapter was trained on another base); names the tensor and both shapes.
    """
    expected = (a.shape[1], b.shape[0]) if fan_in_fan_out else (b.shape[0], a.shape[1])
    if tuple(weight.shape) != expected:
        raise ExportError(f"shape mismatch for {name}: the base model has {tuple(weight.shape)}, the adapter expects "
                          f"{expected} (lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)}); was this checkpoint "
                          f"trained on another base model? Pass the right one with --base")
    if fan_in_fan_out:
        return torch.addmm(weight.float(), a.float().t(), b.float().t(), alpha=scale)
    return torch.addmm(weight.float(), b.float(), a.float(), alpha=scale)


# ----------------------------------------------------------------------------------------------------------------
# Streaming safetensors I/O
# ----------------------------------------------------------------------------------------------------------------


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """:func:`mft_components.models.safetensors_files`, failing with an :class:`ExportError`."""
    try:
        return _model_safetensors_files(Path(model_dir))
    except FileNotFoundError as e:
        raise ExportError(str(e)) from e


@dataclass
class _TensorSpec:
    name: str
    file: Path
    shape: tuple[int, ...]
    out_dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.out_dtype).element_size()


def _read_specs(files: list[Path], dtype: torch.dtype | None) -> list[_TensorSpec]:
    """Names and shapes from the headers only; floating tensors are cast to `dtype` (None: keep), others keep theirs."""
    specs = []
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                if sl.get_dtype() not in _ST_DTYPES:
                    raise ExportError(f"{f}: tensor {name} has dtype {sl.get_dtype()}, which export does not handle "
                                      f"(expected an unquantised model: {', '.join(_ST_DTYPES)})")
                src = _ST_DTYPES[sl.get_dtype()][0]
                out = dtype if src.is_floating_point and dtype is not None else src
                specs.append(_TensorSpec(name, f, tuple(sl.get_shape()), out))
    return specs


def _main_dtype(specs: list[_TensorSpec]) -> torch.dtype:
    """The floating dtype holding most parameters: what config.json declares for `--dtype auto`."""
    counts: dict[torch.dtype, int] = {}
    for s in specs:
        if s.out_dtype.is_floating_point:
            counts[s.out_dtype] = counts.get(s.out_dtype, 0) + math.prod(s.shape)
    return max(counts, key=counts.get) if counts else torch.float32


def parse_size(size: int | str) -> int:
    """`"5GB"` -> 5 * 10**9, `"500MiB"` -> 500 * 2**20, ints pass through (the transformers convention).

    Raises:
        ExportError: not a size.
    """
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if m is None:
        raise ExportError(f"--max-shard-size: expected a size like 5GB, 500MB or 2GiB, got {size!r}")
    unit = m[2] or "B"
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    base = 1024 if "I" in unit else 1000
    return int(float(m[1]) * base**power)


def _plan_shards(specs: list[_TensorSpec], max_bytes: int) -> list[list[_TensorSpec]]:
    """Greedy, in checkpoint order: start a new shard when the next tensor would overflow (a big tensor alone)."""
    shards: list[list[_TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


class _StreamingSafetensorsWriter:
    """Write one safetensors file tensor by tensor: the header (all shapes known up front), then each tensor's bytes.

    The safetensors format is `u64 header length | JSON header | data`; the header is padded with spaces to a multiple
    of 8 and the tensors are ordered by element size (largest first) so every tensor's data stays aligned.
    """

    def __init__(self, path: Path, specs: list[_TensorSpec]):
        self.specs = sorted(specs, key=lambda s: -torch.empty((), dtype=s.out_dtype).element_size())
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in self.specs:
            header[s.name] = {"dtype": _TORCH_TO_ST[s.out_dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs[self._next]
        assert name == spec.name and tuple(tensor.shape) == spec.shape and tensor.dtype == spec.out_dtype, name
        # A flat uint8 view of the tensor's own storage: no second copy of the data.
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        assert self._next == len(self.specs), "not every tensor was written"
        self._file.close()


def write_sharded_weights(out_dir: Path, specs: list[_TensorSpec], max_shard_size: int | str, transform) -> list[Path]:
    """Write `specs` as `model.safetensors` or `model-0000k-of-0000n.safetensors` + index, streaming.

    Args:
        out_dir: directory to write into.
        specs: tensors to write, with their source file and output dtype.
        max_shard_size: bytes per shard (or "5GB").
        transform: `(spec, tensor) -> tensor` applied to each source tensor before the cast (the LoRA merge).

    Returns:
        The written weight files.
    """
    shards = _plan_shards(specs, parse_size(max_shard_size))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    handles: dict[Path, object] = {}
    try:
        for shard, fname in zip(shards, names):
            writer = _StreamingSafetensorsWriter(out_dir / fname, shard)
            for spec in writer.specs:
                if spec.file not in handles:
                    handles[spec.file] = safe_open(spec.file, framework="pt").__enter__()
                tensor = transform(spec, handles[spec.file].get_tensor(spec.name)).to(spec.out_dtype)
                _check_finite(tensor, f"tensor {spec.name} (from {spec.file}, as {_DTYPE_NAMES.get(spec.out_dtype)})",
                              "the weights are corrupted, or the values overflow this --dtype; nothing was written")
                writer.write(spec.name, tensor)
                del tensor
            writer.close()
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs),
                         "total_parameters": sum(math.prod(s.shape) for s in specs)},
            "weight_map": {s.name: fname for shard, fname in zip(shards, names) for s in shard},
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / f for f in names]


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
    data_paths = [p for key in ("data_paths", "valid_data_paths") for p in (data.get(key) or []) if isinstance(p, str)]
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
    config["dtype"] = _DTYPE_NAMES[dtype]
    if "torch_dtype" in config:  # older transformers read this key
        config["torch_dtype"] = _DTYPE_NAMES[dtype]
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
    shutil.copyfile(checkpoint_dir / ADAPTER_WEIGHTS, adapter_out / ADAPTER_WEIGHTS)
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
    from mft_components.data.templates import ChatFormat

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
                if spec.name not in by_weight:
                    return t
                a, b = by_weight[spec.name]
                return merge_lora_tensor(t, a, b, adapter.scale, f"{spec.name} (from {spec.file})",
                                         adapter.fan_in_fan_out)

        specs = _read_specs(safetensors_files(weights_dir), out_dtype)
        if not full:
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
            # The training template becomes the model's chat template: apply_chat_template == training prompt.
            tokenizer.chat_template = chat_format.jinja_chat_template(tokenizer)
            tokenizer.save_pretrained(tmp)
            _write_configs(tmp, checkpoint_dir if full else base_dir, base_dir, out_dtype or _main_dtype(specs), eos_id)
            (tmp / CHAT_FORMAT_FILE).write_text(json.dumps(chat_meta, indent=2) + "\n")
            (tmp / "README.md").write_text(model_card(meta, base_name))
            if not full:
                _write_adapter(tmp / "adapter", checkpoint_dir, base_dir, chat_meta)
        _swap_in(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


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


def _check_adapter_against_base(adapter: LoRAAdapter, specs: list[_TensorSpec], base_dir: Path) -> None:
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
    from mft_components.data.templates import ChatFormat

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `mft export`."""
    parser.add_argument("checkpoint_dir", nargs="?", help="a training checkpoint: output_dir/step_N/")
    parser.add_argument("--adapter", metavar="ADAPTER_DIR",
                        help="instead of a checkpoint: a PEFT LoRA adapter directory to merge onto --base")
    parser.add_argument("--template", choices=["mft", "mftcoder_atorch", "hf"], default=None,
                        help="with --adapter: its training format, written as the chat_template (default: the "
                             "adapter's mft_chat_format.json, else mft, MFTCoder's)")
    parser.add_argument("--output", "-o", required=True, help="directory to write: new, empty, or an earlier export (with --force)")
    parser.add_argument("--base", default=None,
                        help="base model directory (default: base_model_dir from the checkpoint's mft_checkpoint.json; "
                             "required with --adapter)")
    parser.add_argument("--dtype", default="auto", choices=list(OUTPUT_DTYPES),
                        help="dtype of the written weights (default auto: each tensor keeps the base model's dtype)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--adapter-only", action="store_true", help="write only OUTPUT/adapter/ (PEFT format)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in the output directory")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run Python code shipped with the tokenizer (off: such a tokenizer "
                             "is refused, never asked about)")


def run(args: argparse.Namespace) -> int:
    """Run `mft export`; returns the exit status (errors for people go to stderr, status 2)."""
    options = dict(dtype=args.dtype, max_shard_size=args.max_shard_size, adapter_only=args.adapter_only,
                   force=args.force, trust_remote_code=args.trust_remote_code)
    try:
        if (args.adapter is None) == (args.checkpoint_dir is None):
            raise ExportError("give either a CHECKPOINT_DIR or --adapter ADAPTER_DIR (with --base MODEL_DIR)")
        if args.adapter is not None:
            if args.base is None:
                raise ExportError("--adapter needs --base MODEL_DIR, the model the adapter was trained on")
            out = export_adapter(args.adapter, args.base, args.output, template=args.template, **options)
        else:
            if args.template is not None:
                raise ExportError("--template is for --adapter; a checkpoint exports the format it was trained with")
            out = export_checkpoint(args.checkpoint_dir, args.output, base=args.base, **options)
    except ExportError as e:
        print(f"mft export: error: {e}", file=sys.stderr)
        return 2
    what = "PEFT adapter" if args.adapter_only else "Hugging Face model"
    print(f"mft export: wrote {what} to {out}")
    return 0
