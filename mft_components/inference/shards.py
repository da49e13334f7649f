"""Streaming safetensors: tensor specs from the headers, shard plans, and a writer that never holds a model.

Weights are streamed tensor by tensor: the shard plan is made from the safetensors headers, then each shard file is
written one tensor at a time, so peak memory is about one tensor in float32, not the model (let alone twice).
``--dtype auto`` (``OUTPUT_DTYPES``) keeps each tensor's dtype, as ``transformers`` saves a model.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from mft_components.inference.adapters import ExportError, check_finite_tensor
from mft_components.models.weights import safetensors_problem

__all__ = ["OUTPUT_DTYPES", "DTYPE_NAMES", "TensorSpec", "read_specs", "main_dtype", "parse_size",
           "write_sharded_weights"]

# "auto": every floating tensor keeps the dtype it has in the weights being exported.
OUTPUT_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
               torch.float64: "float64"}
# safetensors header dtype codes -> (torch dtype, bytes per element)
_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
_TORCH_TO_ST = {v[0]: k for k, v in _ST_DTYPES.items()}


@dataclass
class TensorSpec:
    """One tensor of the weights being written: its name, the file it comes from, its shape and written dtype."""

    name: str
    file: Path
    shape: tuple[int, ...]
    out_dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.out_dtype).element_size()


def read_specs(files: list[Path], dtype: torch.dtype | None) -> list[TensorSpec]:
    """Names and shapes from the headers only; floating tensors are cast to `dtype` (None: keep), others keep theirs."""
    specs = []
    for f in files:
        problem = safetensors_problem(f)  # before safetensors or anything else trusts the header's sizes
        if problem is not None:
            raise ExportError(problem)
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                if sl.get_dtype() not in _ST_DTYPES:
                    raise ExportError(f"{f}: tensor {name} has dtype {sl.get_dtype()}, which export does not handle "
                                      f"(expected an unquantised model: {', '.join(_ST_DTYPES)})")
                src = _ST_DTYPES[sl.get_dtype()][0]
                out = dtype if src.is_floating_point and dtype is not None else src
                specs.append(TensorSpec(name, f, tuple(sl.get_shape()), out))
    return specs


def main_dtype(specs: list[TensorSpec]) -> torch.dtype:
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


def _plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in checkpoint order: start a new shard when the next tensor would overflow (a big tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
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

    def __init__(self, path: Path, specs: list[TensorSpec]):
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


def write_sharded_weights(out_dir: Path, specs: list[TensorSpec], max_shard_size: int | str, transform) -> list[Path]:
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
                check_finite_tensor(tensor, f"tensor {spec.name} (from {spec.file}, as {DTYPE_NAMES.get(spec.out_dtype)})",
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
