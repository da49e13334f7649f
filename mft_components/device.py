"""The accelerator a rank trains on: host-to-device copies, GPU capability checks, peak memory.

A leaf of the package: it imports nothing else of mft. ``gpu_too_old`` is the one place that reads a GPU's compute
capability (the attention backends, ``compile: auto`` and ``dtype: bf16`` ask it).
"""

from __future__ import annotations

import resource

import torch

__all__ = ["to_device", "capability_reason", "gpu_too_old", "peak_memory_gb"]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without the host waiting: host-to-GPU copies go through pinned memory (the loader's
    batches already are; anything else is pinned first, from torch's caching host allocator) and are queued with
    ``non_blocking=True``; a copy from pageable memory may block the host until the device is idle."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def capability_reason(kernel: str, minimum: tuple[int, int], capability: tuple[int, int], gpu: str) -> str | None:
    """Why ``kernel`` cannot run on a GPU of compute ``capability`` (None when it can)."""
    if tuple(capability) >= minimum:
        return None
    return (f"{kernel} needs a GPU of compute capability {minimum[0]}.{minimum[1]} or newer "
            f"(this one: {gpu}, {capability[0]}.{capability[1]})")


def gpu_too_old(what: str, minimum: tuple[int, int], device: torch.device | str | None = None) -> str | None:
    """Why ``what`` cannot run on the CUDA ``device`` (default: the current one); None when it can, or without CUDA."""
    if not torch.cuda.is_available():
        return None
    return capability_reason(what, minimum, torch.cuda.get_device_capability(device),
                             torch.cuda.get_device_name(device))


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory on CUDA; peak resident host memory (max RSS) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
