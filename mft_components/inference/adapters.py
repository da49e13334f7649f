"""PEFT LoRA adapters as files: reading one (refusing what does not merge as ``W + scale * B @ A``) and merging it.

    W_out = W_base.float() + scale * B.float() @ A.float()     scale = alpha / r  (rsLoRA: alpha / sqrt(r))

``mft export`` (``export.py``) merges an adapter into a base model's weights as it streams them; ``mft generate``
(``generate.py``) merges one into a loaded model. Both read it here, in PEFT's key names, so any PEFT LoRA adapter
(MFTCoder's, or anyone's) merges the same way.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mft_components.models.expert_lora import merge_param_lora, peft_to_param_adapters
from mft_components.training.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointError, load_safetensors

LEGACY_ADAPTER_WEIGHTS = "adapter_model.bin"  # peft before 0.6 and MFTCoder's older adapters

__all__ = ["ExportError", "LoRAAdapter", "LEGACY_ADAPTER_WEIGHTS", "lora_scale", "adapter_weights_file",
           "read_adapter_tensors", "read_adapter", "merge_lora_tensor", "check_finite_tensor",
           "plan_param_merges", "merge_planned"]

_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")
_PEFT_PREFIX = "base_model.model."
# adapter_config.json options whose adapters are not `W + scale * B @ A` on the base weights: refused, with why.
_UNMERGEABLE_OPTIONS = {
    "use_dora": "DoRA rescales each merged weight by a learned magnitude",
    "lora_bias": "lora_B carries a bias",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layer_replication": "layers are replicated",
    "trainable_token_indices": "trained token embeddings",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA pools its inputs",
    "use_bdlora": "block-diagonal LoRA",
}
# Initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, ...): the adapter is relative to the
# rewritten base, not to the one on disk. These keep the base as it is.
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva")


class ExportError(ValueError):
    """A checkpoint, adapter, base model or output directory that cannot be exported (or merged by ``mft
    generate``); the message says what and where."""


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
    # peft target_parameters (fused MoE experts, routers): base tensor name -> (A [E, r, in], B [E, out, r]) or 2-D
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def lora_scale(adapter_config: dict) -> float:
    """`alpha / r`, or `alpha / sqrt(r)` for rsLoRA, as PEFT and `LoRALinear` define it."""
    r, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def adapter_weights_file(adapter_dir: Path) -> Path:
    """`adapter_model.safetensors`, or else the `adapter_model.bin` older peft versions (and MFTCoder) saved.

    Raises:
        ExportError: neither exists.
    """
    for path in (adapter_dir / ADAPTER_WEIGHTS, adapter_dir / LEGACY_ADAPTER_WEIGHTS):
        if path.is_file():
            return path
    raise ExportError(f"{adapter_dir / ADAPTER_WEIGHTS}: not found (nor {LEGACY_ADAPTER_WEIGHTS}); a LoRA/QLoRA "
                      f"checkpoint holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")


def read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter weights file: safetensors, or a PyTorch pickle read with
    `torch.load(weights_only=True)` (tensors and plain containers only: no code in the file runs).

    Raises:
        ExportError: the file is unreadable, truncated, or not a mapping of names to tensors.
    """
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path)
        except CheckpointError as e:
            raise ExportError(str(e)) from e
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a pickle that needs code), EOFError, RuntimeError (truncated zip)
        raise ExportError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ExportError(f"{path}: expected a mapping of tensor names to tensors, as peft saves an adapter")
    return tensors


def read_adapter(adapter_dir: str | Path) -> LoRAAdapter:
    """Load `adapter_config.json` + `adapter_model.safetensors` (PEFT key names) from a checkpoint or adapter dir;
    an older `adapter_model.bin` is read with `torch.load(weights_only=True)`.

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
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ExportError(f"{cfg_path}: not found; a LoRA/QLoRA checkpoint holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    w_path = adapter_weights_file(adapter_dir)
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
    tensors = read_adapter_tensors(w_path)
    for key, tensor in tensors.items():
        check_finite_tensor(tensor, f"{w_path}: tensor {key}", "the adapter is corrupted, or training diverged")
    params = {}
    if config.get("target_parameters"):  # peft's ParamWrapper layout: fused experts, routers
        try:
            rest, factors = peft_to_param_adapters(
                {k.removeprefix(_PEFT_PREFIX).replace(".default.weight", ".weight"): v for k, v in tensors.items()},
                config["target_parameters"], config["r"])
        except ValueError as e:
            raise ExportError(f"{w_path}: {e}") from e
        tensors = {_PEFT_PREFIX + k: v for k, v in rest.items()}
        for key, a in factors.items():
            if key.endswith(".lora_a.weight"):
                owner, _, param = key[: -len(".lora_a.weight")].rpartition(".lora.")
                params[f"{owner}.{param}"] = (a, factors[key.replace(".lora_a.weight", ".lora_b.weight")])
    for key, tensor in tensors.items():
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
                       fan_in_fan_out=bool(config.get("fan_in_fan_out")), params=params)


def check_finite_tensor(tensor: torch.Tensor, what: str, why: str) -> None:
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


# MFTCoder's (transformers 4) Mixtral names: each expert's w1 (gate), w3 (up), w2 (down) linears and the router
# `block_sparse_moe.gate`; transformers 5 stores them fused: mlp.experts.gate_up_proj [E, 2I, H] = [w1; w3] per
# expert, mlp.experts.down_proj [E, H, I] = w2, mlp.gate.weight.
_LEGACY_EXPERT = re.compile(r"^(?P<layer>.+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w[123])$")
_LEGACY_ROUTER = re.compile(r"^(?P<layer>.+)\.block_sparse_moe\.gate$")
_LEGACY_FUSED = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}


def plan_param_merges(adapter: LoRAAdapter, shapes: dict[str, tuple], layout) -> dict[str, list[tuple]]:
    """What merges into each base tensor on disk that holds (part of) a fused expert or router parameter:
    ``{file tensor name: [(index into it or None, A, B, transposed)]}``.

    Covers the adapter's ``target_parameters`` onto either file layout (fused tensors, or one tensor per expert
    as transformers saves Mixtral / Qwen-MoE: each gets its expert's factors, B cut to its rows), and MFTCoder's
    per-expert ``w1`` / ``w2`` / ``w3`` and ``block_sparse_moe.gate`` pairs onto fused files (those pairs leave
    ``adapter.pairs``; onto per-expert files they merge as they are).

    Args:
        shapes: the base's file tensor names and shapes.
        layout: ``expert_lora.ExpertLayout`` of the base.

    Raises:
        ExportError: an adapted parameter the base does not have, or one it stores in a layout not handled.
    """
    plan: dict[str, list[tuple]] = {}
    by_param: dict[str, list[tuple]] = {}
    for disk in shapes:
        name, part, parts, expert = layout.source(disk)
        by_param.setdefault(name, []).append((disk, part, parts, expert))
    for name, (a, b) in adapter.params.items():
        if name not in by_param:
            raise ExportError(f"the adapter targets the parameter {name}, which the base model does not have; was "
                              f"it trained on another base model? Pass the right one with --base")
        transposed = a.ndim == 3 and name in layout.transposed
        for disk, part, parts, expert in by_param[name]:
            if expert is None:
                plan.setdefault(disk, []).append((None, a, b, transposed))
                continue
            if transposed or a.ndim != 3:
                raise ExportError(f"{name}: the base stores it per expert in {disk}, a layout the merge does not "
                                  f"handle for this architecture")
            rows = b.shape[1] // parts
            plan.setdefault(disk, []).append((None, a[expert], b[expert, part * rows:(part + 1) * rows], False))
    for path in list(adapter.pairs):
        if f"{path}.weight" in shapes:
            continue
        expert, router = _LEGACY_EXPERT.match(path), _LEGACY_ROUTER.match(path)
        if expert is not None:
            fused = f"{expert['layer']}.mlp.experts.{_LEGACY_FUSED[expert['w']]}"
            half = {"w1": 0, "w3": 1}.get(expert["w"])
            e = int(expert["e"])
        elif router is not None:
            fused, half, e = f"{router['layer']}.mlp.gate.weight", None, None
        else:
            continue
        whole = [disk for disk, _, _, ex in by_param.get(fused, []) if ex is None]
        if len(whole) != 1 or fused in layout.transposed:
            continue
        a, b = adapter.pairs.pop(path)
        rows = shapes[whole[0]][1] // 2 if half is not None else None
        index = None if e is None else (e,) if half is None else (e, slice(half * rows, (half + 1) * rows))
        plan.setdefault(whole[0], []).append((index, a, b, False))
    return plan


def merge_planned(weight: torch.Tensor, entries: list[tuple], scale: float, name: str) -> torch.Tensor:
    """``weight`` (a float32 copy) plus every planned update (``plan_param_merges``).

    Raises:
        ExportError: an update's shape does not fit.
    """
    out = weight.to(torch.float32, copy=True)
    for index, a, b, transposed in entries:
        target = out if index is None else out[index]
        try:
            target.copy_(merge_param_lora(target, a, b, scale, transposed, name))
        except ValueError as e:
            raise ExportError(f"{e}; was this adapter trained on another base model? Pass the right one with "
                              f"--base") from e
    return out
