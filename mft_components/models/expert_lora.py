"""LoRA on the routed experts and the router of MoE models, whose weights are parameters, not ``nn.Linear``s.

transformers 5 keeps a MoE layer's experts as fused 3-D parameters (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``; GPT-OSS stores them transposed, ``[E, in, out]``) and its router as a module
with a 2-D ``weight [E, H]``. A ``ParamLoRA`` holds per-expert low-rank factors of one such parameter:

    A [E, r, in]   B [E, out, r]        W_e  ->  W_e + scale * B_e @ A_e      (one batched matmul over e)

and the owning module's class is swapped for a subclass whose attribute ``gate_up_proj`` (``down_proj``,
``weight``) reads as that sum inside its forward (everywhere else: the stored parameter), so transformers' own
expert computation (grouped_mm, batched_mm or its eager loop) runs unchanged on the adapted weights: no Python loop over tokens, and an expert's factors receive gradient only
from the tokens routed to it. The base parameter keeps its name and its place in ``_parameters`` (checkpoint
loading, FSDP2 and state dicts see the plain weight). Dropout cannot apply to a weight-space update; these
adapters train without it (as peft's ``target_parameters`` do).

Adapters are saved as peft's ``target_parameters`` (``ParamWrapper``) stores them, so ``peft`` loads them:
``lora_A [E*r, in]`` (expert-major), ``lora_B [out, r*E]`` (expert-minor), and several parameters of one module
nested as ``base_layer.`` wrappers in the module's parameter order (the first is innermost).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

__all__ = ["ParamLoRA", "EXPERT_PARAMS", "apply_expert_lora", "expert_targets", "lora_target_parameters",
           "param_adapters_to_peft", "peft_to_param_adapters", "merge_param_lora", "init_param_lora",
           "MFTCODER_EXPERT_NAMES", "expert_target_names", "ExpertLayout", "quantize_experts",
           "fold_param_adapters", "expert_count"]

# Fused expert parameters, in the order every transformers family registers them (peft nests in this order).
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
ROUTER_NAMES = ("gate", "router")  # the MoE block's attribute holding the router
# MFTCoder / transformers 4 Mixtral names for each expert's linears -> the fused parameter holding them:
# w1 (gate) and w3 (up) are the two halves of gate_up_proj, w2 is down_proj.
MFTCODER_EXPERT_NAMES = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}
# target_modules names that select fused expert parameters / the router (besides "all-linear").
expert_target_names = ("experts", "experts.gate_up_proj", "experts.up_proj", "experts.down_proj", *ROUTER_NAMES,
                       *MFTCODER_EXPERT_NAMES)


class _Factor(nn.Module):
    """One LoRA factor; a module so that its parameter is named ``....lora_a.weight`` like a LoRALinear's."""

    def __init__(self, shape, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))


class ParamLoRA(nn.Module):
    """The low-rank update of one weight parameter: 2-D ``[out, in]`` (a router) or 3-D per expert.

    Args:
        shape: the base parameter's shape, ``[out, in]``, ``[E, out, in]`` or (``transposed``) ``[E, in, out]``.
        transposed: the 3-D parameter is stored ``[E, in, out]`` (GPT-OSS).
        rank, alpha, use_rslora: as ``LoRALinear``.
    """

    def __init__(self, shape, transposed: bool, rank: int, alpha: float, use_rslora: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if len(shape) not in (2, 3):
            raise ValueError(f"ParamLoRA: expected a 2-D or 3-D parameter, got shape {tuple(shape)}")
        lead = tuple(shape[:-2])
        out_dim, in_dim = (shape[-1], shape[-2]) if transposed else (shape[-2], shape[-1])
        self.transposed = transposed
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.lora_a = _Factor(lead + (rank, in_dim), dtype, device)
        self.lora_b = _Factor(lead + (out_dim, rank), dtype, device)

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` per expert, laid out as the base parameter."""
        d = torch.matmul(self.lora_b.weight, self.lora_a.weight) * self.scaling
        return d.transpose(-1, -2) if self.transposed else d

    def extra_repr(self) -> str:
        return f"A={tuple(self.lora_a.weight.shape)}, B={tuple(self.lora_b.weight.shape)}, scaling={self.scaling:.4g}"


def init_param_lora(a: torch.Tensor, b: torch.Tensor) -> None:
    """A uniform in +-1/sqrt(in) per expert (nn.Linear's Kaiming init of LoRALinear's lora_a), B zeros."""
    bound = 1.0 / math.sqrt(a.shape[-1])
    with torch.no_grad():
        a.uniform_(-bound, bound)
        b.zero_()


def _adapted_weight(module: nn.Module, name: str) -> torch.Tensor:
    cache = module.__dict__.get("_lora_weights")
    if cache is not None and name in cache:
        return cache[name]
    base = module._parameters[name]
    shape = module.__dict__.get("_nf4_shapes", {}).get(name)
    if shape is not None:  # a 4-bit base stored [E*out, in]: dequantised to the compute dtype, as a LoRALinear's
        base = base.to(module._nf4_dtype).view(shape)
    adapters = module._modules.get("lora")
    if adapters is None or name not in adapters:
        return base
    return base + adapters[name].delta().to(base.dtype)


def _param_property(name: str) -> property:
    # Only inside the module's forward does the name read as the adapted weight: everything else (FSDP2, which
    # re-reads its parameters with getattr, state dicts, optimizers) sees the stored parameter itself.
    def get(self):
        cache = self.__dict__.get("_lora_weights")
        if cache is not None and name in cache:
            return cache[name]
        return nn.Module.__getattr__(self, name)

    return property(get, doc=f"{name}; inside forward: dequantised and plus its LoRA update where it has them")


def _forward_once(self, *args, **kwargs):
    # The eager expert loop reads gate_up_proj[e] once per expert: build each adapted weight once per forward.
    names = set(self._modules.get("lora") or ()) | set(self.__dict__.get("_nf4_shapes", {}))
    self._lora_weights = {name: _adapted_weight(self, name) for name in names}
    try:
        return super(type(self), self).forward(*args, **kwargs)
    finally:
        self._lora_weights = None


_ADAPTED_CLASSES: dict[type, type] = {}


def _adapted_class(cls: type) -> type:
    if cls in _ADAPTED_CLASSES.values():
        return cls
    if cls not in _ADAPTED_CLASSES:
        attrs = {name: _param_property(name) for name in (*EXPERT_PARAMS, "weight")}
        attrs["forward"] = _forward_once
        _ADAPTED_CLASSES[cls] = type(f"LoRA{cls.__name__}", (cls,), attrs)
    return _ADAPTED_CLASSES[cls]


def _fused_params(module: nn.Module) -> list[str]:
    return [n for n in EXPERT_PARAMS if getattr(module._parameters.get(n), "ndim", 0) == 3]


def _router_of(moe_block: nn.Module) -> tuple[str, nn.Module] | None:
    for name in ROUTER_NAMES:
        router = moe_block._modules.get(name)
        weight = router._parameters.get("weight") if router is not None else None
        if router is not None and not isinstance(router, nn.Linear) and getattr(weight, "ndim", 0) == 2:
            return name, router
    return None


def expert_targets(layer: nn.Module, targets) -> dict[str, list[str]]:
    """{module path in ``layer``: [parameter names to adapt]} for the experts / routers ``targets`` select.

    ``targets``: "all-linear" (every fused expert parameter and the router), or names: ``experts`` (every fused
    expert parameter), ``experts.gate_up_proj`` / ``experts.down_proj``, MFTCoder's ``w1`` / ``w3`` (the gate_up
    halves) and ``w2`` (down), ``router`` / ``gate`` (the router's weight).
    """
    names = set(targets) if targets != "all-linear" else {"experts", "router"}
    out: dict[str, list[str]] = {}
    for path, module in layer.named_modules():
        fused = _fused_params(module)
        if not fused:
            continue
        wanted = [n for n in fused if "experts" in names or f"experts.{n}" in names
                  or any(MFTCODER_EXPERT_NAMES[m] == n for m in names & set(MFTCODER_EXPERT_NAMES))
                  or (n == "up_proj" and names & {"w1", "w3"})]
        if wanted:
            out[path] = wanted
        parent_path = path.rpartition(".")[0]
        router = _router_of(layer.get_submodule(parent_path) if parent_path else layer)
        if router is not None and names & set(ROUTER_NAMES):
            out[f"{parent_path}.{router[0]}" if parent_path else router[0]] = ["weight"]
    return out


def quantize_experts(layer: nn.Module, quantize) -> int:
    """QLoRA: store every fused expert parameter of ``layer`` as a 2-D NF4 weight ``[E*out, in]`` (torchao's NF4
    is 2-D; FSDP2 shards it by rows like any NF4 weight), read back dequantised to its dtype in the 3-D shape.
    ``quantize``: ``lora.quantize_nf4``. Loading reshapes the checkpoint's 3-D tensor to the stored 2-D one.
    Returns the number of parameters quantised."""
    count = 0
    for _, module in list(layer.named_modules()):
        for name in _fused_params(module):
            base = module._parameters[name]
            shape = tuple(base.shape)
            flat = torch.empty(shape[0] * shape[1], shape[2], dtype=base.dtype, device=base.device)
            try:
                weight = quantize(flat)
            except ValueError:  # a size NF4 cannot block: keep it as it is
                continue
            module._parameters[name] = nn.Parameter(weight, requires_grad=False)
            module.__dict__.setdefault("_nf4_shapes", {})[name] = shape
            module._nf4_dtype = base.dtype
            module.__class__ = _adapted_class(type(module))
            count += 1
    return count


def apply_expert_lora(layer: nn.Module, targets, lora: dict) -> list[str]:
    """Give the experts / routers of ``layer`` that ``targets`` select a ``ParamLoRA`` per adapted parameter
    (meta device is fine; ``init_param_lora`` initialises them). Returns the adapted parameters' paths."""
    adapted = []
    for path, names in expert_targets(layer, targets).items():
        module = layer.get_submodule(path)
        transposed = bool(getattr(module, "is_transposed", False)) and names[0] != "weight"
        adapters = nn.ModuleDict()
        for name in names:
            base = module._parameters[name]
            adapters[name] = ParamLoRA(base.shape, transposed, lora["rank"], lora["alpha"], lora["use_rslora"],
                                       dtype=base.dtype, device=base.device)
            adapted.append(f"{path}.{name}")
        module.lora = adapters
        module.__class__ = _adapted_class(type(module))
    return adapted


@torch.no_grad()
def fold_param_adapters(model: nn.Module) -> None:
    """Merge every ParamLoRA into its base parameter (NF4 experts dequantised) and give each module back its
    transformers class: the model computes what it computed, as plain transformers modules."""
    for module in list(model.modules()):
        if type(module) not in _ADAPTED_CLASSES.values():
            continue
        names = set(module._modules.get("lora") or ()) | set(module.__dict__.get("_nf4_shapes", {}))
        merged = {name: _adapted_weight(module, name).detach() for name in names}
        for name, weight in merged.items():
            module._parameters[name] = nn.Parameter(weight.clone(), requires_grad=False)
        module._modules.pop("lora", None)
        module.__dict__.pop("_nf4_shapes", None)
        module.__class__ = module.__class__.__bases__[0]


def expert_count(module: nn.Module, name: str) -> int:
    """E of a fused expert parameter, also when it is stored as 2-D NF4 (``quantize_experts``)."""
    shape = module.__dict__.get("_nf4_shapes", {}).get(name)
    return shape[0] if shape is not None else module._parameters[name].shape[0]


def lora_target_parameters(model: nn.Module) -> list[str]:
    """peft's ``target_parameters`` for the adapted parameters of ``model`` (e.g. ``mlp.experts.gate_up_proj``)."""
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, ParamLoRA):
            owner, _, param = name.rpartition(".lora.")
            found.add(".".join(owner.split(".")[-2:] + [param]))  # mlp.experts.gate_up_proj, mlp.gate.weight
    return sorted(found)


# ------------------------------------------------------------------------------ peft's ParamWrapper layout

def _nesting(keys) -> dict[str, list[str]]:
    """{owner path: adapted parameter names in registration order} from ``<owner>.lora.<param>.lora_a.weight``."""
    owners: dict[str, set[str]] = {}
    for key in keys:
        if ".lora." in key and key.endswith(".lora_a.weight"):
            owner, _, rest = key.rpartition(".lora.")
            owners.setdefault(owner, set()).add(rest[: -len(".lora_a.weight")])
    order = (*EXPERT_PARAMS, "weight")
    return {o: sorted(ps, key=order.index) for o, ps in owners.items()}


def param_adapters_to_peft(state_dict: dict[str, torch.Tensor], prefix: str = "base_model.model.") -> dict:
    """ParamLoRA factors keyed ``<owner>.lora.<param>.lora_a.weight`` (owner: the transformers module path)
    -> peft's keys and shapes. Other keys are left out."""
    out = {}
    for owner, params in _nesting(state_dict).items():
        for i, param in enumerate(params):
            a = state_dict[f"{owner}.lora.{param}.lora_a.weight"]
            b = state_dict[f"{owner}.lora.{param}.lora_b.weight"]
            if a.ndim == 3:  # [E, r, in] -> [E*r, in];  [E, out, r] -> [out, r*E] with column r*E + e
                a = a.reshape(-1, a.shape[-1])
                b = b.permute(1, 2, 0).reshape(b.shape[1], -1)
            key = f"{prefix}{owner}." + "base_layer." * (len(params) - 1 - i)
            out[key + "lora_A.weight"] = a.contiguous()
            out[key + "lora_B.weight"] = b.contiguous()
    return out


def peft_to_param_adapters(state_dict: dict[str, torch.Tensor], target_parameters, rank: int) -> tuple[dict, dict]:
    """Split a peft state dict (keys without ``base_model.model.``) into (the rest, ParamLoRA factors keyed
    ``<owner>.lora.<param>.lora_{a,b}.weight`` in our shapes) using the config's ``target_parameters``.

    Raises:
        ValueError: a target parameter's factors do not fit ``rank``.
    """
    targets = list(target_parameters or [])
    if not targets:
        return dict(state_dict), {}
    by_owner: dict[str, list[str]] = {}
    for t in targets:
        owner, _, param = t.rpartition(".")
        by_owner.setdefault(owner, []).append(param)
    order = (*EXPERT_PARAMS, "weight")
    rest, factors = {}, {}
    for key, value in state_dict.items():
        m = key.rsplit(".lora_", 1)
        if len(m) != 2 or m[1] not in ("A.weight", "B.weight"):
            rest[key] = value
            continue
        path, depth = m[0], 0
        while path.endswith(".base_layer"):
            path, depth = path[: -len(".base_layer")], depth + 1
        owner_suffix = next((o for o in by_owner if path == o or path.endswith(f".{o}")), None)
        if owner_suffix is None:
            rest[key] = value
            continue
        params = sorted(by_owner[owner_suffix], key=lambda p: order.index(p) if p in order else len(order))
        # all listed parameters exist on every matching module in the families we know: innermost = first
        param = params[len(params) - 1 - depth]
        which = m[1][0].lower()
        if which == "a":
            experts = value.shape[0] // rank
            if value.shape[0] % rank:
                raise ValueError(f"{key}: {tuple(value.shape)} is not [E*r, in] for r={rank}")
            value = value.reshape(experts, rank, -1) if experts > 1 else value
        else:
            cols = value.shape[1]
            if cols % rank:
                raise ValueError(f"{key}: {tuple(value.shape)} is not [out, r*E] for r={rank}")
            experts = cols // rank
            value = value.reshape(value.shape[0], rank, experts).permute(2, 0, 1) if experts > 1 else value
        factors[f"{path}.lora.{param}.lora_{which}.weight"] = value.contiguous()
    return rest, factors


def merge_param_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool,
                     name: str = "weight") -> torch.Tensor:
    """``weight + scale * B @ A`` per expert in float32 (2-D or 3-D, ``transposed`` for ``[E, in, out]``).

    Raises:
        ValueError: the factors do not fit the weight's shape.
    """
    delta = torch.matmul(b.float(), a.float()) * scale
    if transposed:
        delta = delta.transpose(-1, -2)
    if tuple(delta.shape) != tuple(weight.shape):
        raise ValueError(f"shape mismatch for {name}: the base model has {tuple(weight.shape)}, the adapter gives "
                         f"{tuple(delta.shape)} (lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)})")
    return weight.float() + delta


class ExpertLayout:
    """How a model directory's architecture holds its fused experts, from a meta-device copy (no weights read):
    ``transposed`` (parameters stored ``[E, in, out]``, GPT-OSS) and ``source(key)``, where a tensor of its
    safetensors files goes in the model (transformers' conversion table: Mixtral's per-expert ``w1`` / ``w3``
    files are rows of ``gate_up_proj``, ``block_sparse_moe.gate`` is ``mlp.gate``)."""

    def __init__(self, model_dir):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        self.transposed = {f"{path}.{name}" for path, module in model.named_modules()
                           for name in _fused_params(module) if getattr(module, "is_transposed", False)}
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping

            self.transforms = get_model_conversion_mapping(model)
        except Exception:  # noqa: BLE001 - another transformers: keys as they are
            self.transforms = []

    def source(self, key: str) -> tuple[str, int | None, int, int | None]:
        """(model parameter name, part, parts, expert): the file tensor ``key`` is ``part`` of ``parts`` row
        blocks of expert ``expert`` of that parameter (None, 1, None: the whole parameter)."""
        for transform in self.transforms:
            new_key, pattern = transform.rename_source_key(key)
            if pattern is None:
                continue
            if not getattr(transform, "operations", None):
                key = new_key
                continue
            numbers = re.findall(r"\.(\d+)\.", key)
            patterns = list(transform.source_patterns)
            return new_key, patterns.index(pattern), len(patterns), int(numbers[-1]) if numbers else 0
        return key, None, 1, None
