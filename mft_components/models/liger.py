"""liger-kernel's Triton kernels for a model (``model.liger``): RMSNorm, SwiGLU / GeGLU, RoPE (CUDA only).

Its fused linear cross entropy is the loss's business (``loss.cross_entropy: liger``, ``loss/cross_entropy.py``).
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Callable

import torch
from torch import nn

__all__ = ["LIGER_KERNELS", "liger_kernel_names", "resolve_liger", "apply_liger_kernels", "liger_options"]

LIGER_KERNELS = ("rms_norm", "swiglu", "rope")


def liger_kernel_names(value) -> tuple[str, ...]:
    """``model.liger`` as kernel names, wherever the run is: false -> (), true -> all of ``LIGER_KERNELS``
    (``mft validate`` checks this much; the device and the package are ``resolve_liger``'s).

    Raises:
        ValueError: unknown names.
    """
    if not value:
        return ()
    kernels = LIGER_KERNELS if value is True else tuple([value] if isinstance(value, str) else value)
    unknown = sorted(set(kernels) - set(LIGER_KERNELS))
    if unknown:
        raise ValueError(f"model.liger: unknown kernels {unknown}; expected true or a list of {list(LIGER_KERNELS)}")
    return kernels


def resolve_liger(value, device: torch.device) -> tuple[str, ...]:
    """``model.liger`` as the kernel names to apply on ``device``: false -> (), true -> all of ``LIGER_KERNELS``.

    Raises:
        ValueError: unknown names, a device other than CUDA, or liger-kernel not installed.
    """
    kernels = liger_kernel_names(value)
    if not kernels:
        return ()
    if torch.device(device).type != "cuda":
        raise ValueError(f"model.liger: liger-kernel's Triton kernels run on CUDA only, not {device}; set it to false")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("model.liger: needs the liger-kernel package (pip install 'mft[gpu]'); or set it to false")
    return kernels


def apply_liger_kernels(hf_model: nn.Module, kernels: tuple[str, ...]) -> None:
    """Swap in liger-kernel's Triton RMSNorm / SwiGLU / RoPE for this model instance (its per-family
    ``apply_liger_kernel_to_*``; LoRA linears inside the MLP stay, the fused SiLU x up calls them). Its RoPE patch
    replaces the family's ``apply_rotary_pos_emb`` module-wide, as liger does.

    Raises:
        ValueError: liger-kernel has no kernels for this ``model_type``.
    """
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = hf_model.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise ValueError(f"model.liger: liger-kernel has no kernels for model_type {model_type!r}; set it to false")
    apply(model=hf_model, **liger_options(apply, kernels, model_type))


# mft's kernel name -> liger's keyword for it; the MLP's gated activation is SwiGLU, or GeGLU in the Gemma family.
_LIGER_KEYWORDS = {"rms_norm": ("rms_norm",), "rope": ("rope",), "swiglu": ("swiglu", "geglu")}


def liger_options(apply: Callable, kernels: tuple[str, ...], model_type: str) -> dict[str, bool]:
    """Keyword arguments of a liger ``apply_liger_kernel_to_*`` function that apply exactly ``kernels``: every
    kernel liger would apply by default (e.g. Gemma's geglu, the fused linear cross entropy) is off unless asked for.

    Raises:
        ValueError: a kernel asked for that liger has not for this ``model_type``.
    """
    accepted = inspect.signature(apply).parameters
    options = {name: False for name, p in accepted.items() if isinstance(p.default, bool)}
    for kernel in kernels:
        keyword = next((k for k in _LIGER_KEYWORDS[kernel] if k in accepted), None)
        if keyword is None:
            raise ValueError(f"model.liger: liger-kernel has no {kernel} kernel for model_type {model_type!r}; "
                             f"list the others ({[k for k in LIGER_KERNELS if k != kernel]}) or set it to false")
        options[keyword] = True
    return options
