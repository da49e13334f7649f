"""Streaming a model's safetensors weights into its (meta, possibly sharded) parameters, one tensor at a time.

Peak host memory while loading is the final model plus about one tensor (safetensors files are memory mapped),
never two copies of the model: each checkpoint tensor is cast, quantised to NF4 where the parameter is NF4, cut to
this rank's FSDP2 shard where the parameter is a DTensor (``parallelize.make_param_like``), and assigned. Keys are
mapped with transformers' own conversion table for the architecture (renames, per-expert MoE weights stacked).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mft_components.models.expert_lora import ParamLoRA, expert_count, init_param_lora
from mft_components.models.lora import LoRALinear
from mft_components.models.model import MFTModel
from mft_components.models.parallelize import make_param_like

__all__ = ["safetensors_files", "safetensors_problem", "parameter_owners", "load_weights"]

_MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound on the JSON header

log = logging.getLogger(__name__)


def parameter_owners(module: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """{name: [(owning module, attribute), ...]}; tied parameters list all their owners under the first name."""
    by_id: dict[int, str] = {}
    owners: dict[str, list[tuple[nn.Module, str]]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, param in mod._parameters.items():
            if param is None:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            first = by_id.setdefault(id(param), name)
            owners.setdefault(first, []).append((mod, attr))
            if first != name:
                owners[name] = owners[first]  # alias: a checkpoint may hold either name
    return owners


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a HF model directory, from the index when sharded (each file once, index order).

    Raises:
        FileNotFoundError: the directory holds no safetensors weights.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: lists shards that are not in the directory: {missing[:5]}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in model_dir.iterdir())
    raise FileNotFoundError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json (found: {found[:20]}); "
        "convert .bin checkpoints to safetensors first"
    )


def safetensors_problem(path: Path) -> str | None:
    """What makes a safetensors file unusable, from its header and its size alone (no tensor is read), or None.

    A header claiming more bytes than the file holds (a 1 TB tensor in a 1 MB file: damaged, truncated or
    hostile) is named before anything allocates memory for it.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path}: {size} bytes, too short for a safetensors file"
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                return f"{path}: its header length claims {n:,} bytes, the file holds {size:,}: damaged or truncated"
            header = json.loads(f.read(n))
        spans = [entry["data_offsets"] for name, entry in header.items() if name != "__metadata__"]
        claimed = max((int(end) for _, end in spans), default=0)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return f"{path}: not a readable safetensors header ({type(e).__name__}: {e})"
    held = size - 8 - n
    if claimed != held:
        return (f"{path}: its header describes {claimed:,} bytes of tensors ({claimed / 1e9:,.1f} GB), the file holds "
                f"{held:,} after the header: damaged, truncated, or not the model it claims to be")
    return None


class _KeyMapper:
    """Checkpoint key -> model parameter name, using transformers' own conversion table for the architecture
    (renames such as GPT-NeoX's `embed_out` -> `lm_head`, and per-expert MoE weights stacked into the fused
    expert tensors). Expert tensors are gathered until a layer's set is complete, then merged."""

    def __init__(self, hf_model: nn.Module, owners: dict):
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping

            self.transforms = get_model_conversion_mapping(hf_model)
        except Exception as exc:  # older / newer transformers: exact key names only
            log.debug("no transformers conversion mapping: %s", exc)
            self.transforms = []
        self.owners = owners
        self.pending: dict[str, tuple[object, dict[str, dict[int, torch.Tensor]]]] = {}

    def __call__(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key in self.owners:
            return [(key, tensor)]
        for transform in self.transforms:
            new_key, pattern = transform.rename_source_key(key)
            if pattern is None:
                continue
            if not hasattr(transform, "operations") or not transform.operations:
                key = new_key
                continue
            return self._collect(transform, key, new_key, pattern, tensor)
        return [(key, tensor)]

    def _collect(self, transform, key, target, pattern, tensor):
        # The expert index is the last integer in the key: model.layers.L.mlp.experts.E.gate_proj.weight
        numbers = re.findall(r"\.(\d+)\.", key)
        index = int(numbers[-1]) if numbers else 0
        _, groups = self.pending.setdefault(target, (transform, {}))
        groups.setdefault(pattern, {})[index] = tensor
        n_experts = self._expected(target)
        if len(groups) < len(transform.source_patterns) or any(len(g) < n_experts for g in groups.values()):
            return []
        del self.pending[target]
        data = {p: [groups[p][i] for i in range(n_experts)] for p in transform.source_patterns}
        for op in transform.operations:
            data = op.convert(data, source_patterns=transform.source_patterns, target_patterns=transform.target_patterns)
        (merged,) = data.values()
        return [(target, merged)]

    def _expected(self, target: str) -> int:
        mod, attr = self.owners[target][0]
        return expert_count(mod, attr)


@torch.no_grad()
def load_weights(model: MFTModel, owners: dict, device: torch.device, dtype: torch.dtype) -> None:
    """Stream the safetensors weights of `model.model_dir` into `model`'s (meta, possibly sharded) parameters.

    One checkpoint tensor is materialised at a time: cast to `dtype`, quantised to NF4 where the parameter is
    NF4, cut to this rank's shard where the parameter is a DTensor. LoRA adapters are initialised afterwards.

    Raises:
        ValueError: shape mismatches, unexpected checkpoint keys, or model parameters missing from the checkpoint.
    """
    model_dir = Path(model.model_dir)
    mapper = _KeyMapper(model.hf_model, owners)
    buffers = _persistent_buffers(model.hf_model)
    unexpected: list[str] = []
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                for name, tensor in mapper(key, f.get_tensor(key)):
                    if name not in owners and name in buffers:  # e.g. DeepSeek-V3's router score correction
                        mod, attr = buffers[name]
                        old = mod._buffers[attr]
                        if tuple(old.shape) != tuple(tensor.shape):
                            raise ValueError(f"{file.name}: {key}: checkpoint shape {tuple(tensor.shape)} != model "
                                             f"buffer shape {tuple(old.shape)}")
                        mod._buffers[attr] = tensor.to(device=old.device, dtype=old.dtype, copy=True)
                        continue
                    if name not in owners:
                        if not name.endswith("rotary_emb.inv_freq"):
                            unexpected.append(f"{file.name}: {name}")
                        continue
                    _assign(owners[name], tensor, device, dtype, f"{file.name}: {key}")
    if unexpected:
        raise ValueError(f"{model_dir}: checkpoint tensors the {type(model.hf_model).__name__} architecture does not "
                         f"have: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    missing = []
    for name, own in owners.items():
        mod, attr = own[0]
        if isinstance(mod, LoRALinear) and attr == "weight" and mod._parameters[attr] is None:
            continue
        param = mod._parameters[attr]
        if ".lora_a." in f".{name}." or ".lora_b." in f".{name}.":
            continue
        if _is_meta(param):
            missing.append(name)
    if missing:
        raise ValueError(f"{model_dir}: checkpoint has no weights for {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} (is it the right model directory?)")
    _init_lora(model, device)
    for mod in model.modules():  # buffers were built for real on CPU (rotary inv_freq etc.)
        for name, buf in mod._buffers.items():
            if buf is not None and buf.device != device:
                mod._buffers[name] = buf.to(device)


def _persistent_buffers(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """{state-dict name: (module, attribute)} of the buffers a checkpoint holds (persistent ones)."""
    out = {}
    for mod_name, mod in module.named_modules():
        for attr, buf in mod._buffers.items():
            if buf is not None and attr not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{attr}" if mod_name else attr] = (mod, attr)
    return out


def _is_meta(t: torch.Tensor) -> bool:
    local = getattr(t, "_local_tensor", t)
    return local.device.type == "meta"


def _assign(own: list[tuple[nn.Module, str]], full: torch.Tensor, device, dtype, where: str) -> None:
    mod, attr = own[0]
    old = mod._parameters[attr]
    if full.ndim == 3 and attr in mod.__dict__.get("_nf4_shapes", {}) and tuple(full.shape) == mod._nf4_shapes[attr]:
        full = full.reshape(old.shape)  # fused experts stored as 2-D NF4 (expert_lora.quantize_experts)
    if tuple(old.shape) != tuple(full.shape):
        raise ValueError(f"{where}: checkpoint shape {tuple(full.shape)} != model shape {tuple(old.shape)}")
    # copy=True: never keep a parameter backed by the memory-mapped checkpoint file
    full = full.to(device=device, dtype=dtype if full.is_floating_point() else full.dtype, copy=True)
    new = make_param_like(old, full)
    for m, a in own:
        m._parameters[a] = new
    if full.device.type == "cpu" and new is not None and type(getattr(new, "_local_tensor", new)) is not torch.Tensor:
        del full
        _trim_host_memory()  # NF4 quantisation frees many small transients glibc would otherwise keep


def _trim_host_memory() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim; no-op elsewhere)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _init_lora(model: MFTModel, device) -> None:
    """Materialise LoRA weights: lora_a Kaiming-uniform from the global RNG (same on every rank), lora_b zeros."""
    for mod in model.modules():
        if isinstance(mod, ParamLoRA):  # per-expert factors: each expert's A initialised as a LoRALinear's
            a, b = mod.lora_a.weight, mod.lora_b.weight
            full_a = torch.empty(a.shape, dtype=a.dtype, device="cpu")
            full_b = torch.empty(b.shape, dtype=b.dtype, device="cpu")
            init_param_lora(full_a, full_b)
            mod.lora_a._parameters["weight"] = make_param_like(a, full_a.to(device))
            mod.lora_b._parameters["weight"] = make_param_like(b, full_b.to(device))
            continue
        if not isinstance(mod, LoRALinear):
            continue
        for sub in (mod.lora_a, mod.lora_b):
            old = sub.weight
            full = torch.empty(old.shape, dtype=old.dtype, device="cpu")
            if sub is mod.lora_a:
                nn.init.kaiming_uniform_(full, a=5 ** 0.5)
            else:
                nn.init.zeros_(full)
            sub._parameters["weight"] = make_param_like(old, full.to(device))
