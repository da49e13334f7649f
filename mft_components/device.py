"""The accelerator a rank trains on: host-to-device copies, GPU capability checks, peak memory.

A leaf of the package: it imports nothing else of mft. ``gpu_too_old`` is the one place that reads a GPU's compute
capability (the attention backends, ``compile: auto`` and ``dtype: bf16`` ask it). ``disk_full`` words a full
disk (checkpoints, exports, the tokenisation cache) for the person who must free space.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import traceback

import torch

__all__ = ["to_device", "capability_reason", "gpu_too_old", "peak_memory_gb", "DiskFullError", "disk_full",
           "tensor_bytes"]

# errno -> what it means for the person: no space, no quota, or a file-size limit (ulimit -f, RLIMIT_FSIZE).
_DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
              errno.EFBIG: "a file would exceed this process's file-size limit (ulimit -f)"}


class DiskFullError(OSError):
    """Writing stopped for want of space; the message names the directory, the bytes needed and those free."""


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def disk_full(error: BaseException, what: str, directory: str | os.PathLike, needed_bytes: int) -> DiskFullError | None:
    """The ``DiskFullError`` to raise for ``error`` when it is a full disk (ENOSPC, EDQUOT, EFBIG, as an OSError
    or in a writer's message), or a failed write of more than the free space; else None.

    Args:
        error: what the write raised.
        what: what was being written ("checkpoint step_40").
        directory: where.
        needed_bytes: about how much it needs in all.
    """
    code = error.errno if isinstance(error, OSError) else None
    if code is None:  # safetensors' Rust writer says "... (os error 28)"; torch.save only "unexpected pos"
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    free_bytes = _free_bytes(directory)
    if code not in _DISK_FULL:
        if not (isinstance(error, (OSError, RuntimeError)) and free_bytes is not None and free_bytes < needed_bytes):
            return None
        code = errno.ENOSPC  # a write that failed where what it needs does not fit
    # The failed writer's frames still hold its open (already deleted) file, whose space the free count would
    # miss: clear their locals (the traceback itself stays printable), then count.
    traceback.clear_frames(error.__traceback__)
    free_bytes = _free_bytes(directory)
    free = f"{_megabytes(free_bytes)} free there" if free_bytes is not None else "free space unknown"
    return DiskFullError(f"{_DISK_FULL[code]}: writing {what} into {directory} needs about "
                         f"{_megabytes(needed_bytes)}, {free} ({os.strerror(code)}); nothing was left half-written: "
                         f"free space there, or write elsewhere")


def _free_bytes(directory: str | os.PathLike) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in ``obj`` (nested dicts, lists, tuples): about what saving it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


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
