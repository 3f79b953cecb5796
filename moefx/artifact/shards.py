"""Writing safetensors files one tensor at a time, so that memory holds one tensor, not a model.

A ``PlannedTensor`` is a name, a shape, a dtype and a function that makes the tensor when the
writer reaches it. ``write_shards`` lays the plan out in files of at most ``max_shard_bytes``
(``model-00001-of-0000N.safetensors`` + ``model.safetensors.index.json``, as Hugging Face hub
checkpoints are; one ``model.safetensors`` when it fits; ``parse_size`` reads "5GB"-style limits),
writes each file's header from the plan alone, then each tensor's bytes as it is made. Converting a checkpoint streams through it: a
tensor read from a memory-mapped file, or an expert stack built from one, is written and dropped.

The file layout is safetensors' own: an 8-byte little-endian header length, a JSON header
(``{name: {dtype, shape, data_offsets}}``, ``__metadata__``) padded with spaces to 8 bytes, then
the data.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moefx.artifact.format import DTYPES, INDEX, WEIGHTS

SAFETENSORS_DTYPES = {dtype: name for name, dtype in DTYPES.items()} | {torch.bool: "BOOL"}
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], Tensor]  # called once, when the writer reaches this tensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def planned(name: str, tensor: Tensor) -> PlannedTensor:
    """A plan entry for a tensor already in memory."""
    return PlannedTensor(name, tuple(tensor.shape), tensor.dtype, lambda: tensor)


def shard_groups(plan: Sequence[PlannedTensor], max_shard_bytes: int | None) -> list[list[PlannedTensor]]:
    """The plan, in order, cut into files of at most ``max_shard_bytes`` (a tensor larger than
    that gets a file of its own, as ``save_pretrained`` does)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for entry in plan:
        if groups[-1] and max_shard_bytes is not None and size + entry.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


def write_shards(
    plan: Sequence[PlannedTensor], directory: str | Path, *, max_shard_bytes: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``plan`` into ``directory`` (which must exist); returns the files written. One
    ``model.safetensors`` when everything fits one shard, else numbered shards and an index."""
    names = [entry.name for entry in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"the plan names a tensor twice: {sorted({n for n in names if names.count(n) > 1})[:4]}")
    directory = Path(directory)
    groups = shard_groups(plan, max_shard_bytes)
    if len(groups) == 1:
        files = [directory / WEIGHTS]
    else:
        files = [directory / SHARD_NAME.format(index=i + 1, count=len(groups)) for i in range(len(groups))]
    for file, group in zip(files, groups):
        write_safetensors(group, file, metadata=metadata)
    if len(groups) > 1:
        weight_map = {entry.name: file.name for file, group in zip(files, groups) for entry in group}
        index = {"metadata": {"total_size": sum(e.nbytes for e in plan)}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files


def write_safetensors(plan: Sequence[PlannedTensor], file: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, its tensors made and written one at a time in the plan's order."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for entry in plan:
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{entry.name}: safetensors has no dtype {entry.dtype}")
        header[entry.name] = {
            "dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape), "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for entry in plan:
            f.write(_bytes_of(entry))


def _bytes_of(entry: PlannedTensor) -> memoryview:
    tensor = entry.make()
    if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
        raise ValueError(
            f"{entry.name}: planned as {entry.dtype} {list(entry.shape)} but made {tensor.dtype} {list(tensor.shape)}"
        )
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def parse_size(size: int | str | None) -> int | None:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MiB"``; None stays None (no limit)."""
    if size is None or (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        return size
    match = _SIZE.match(size) if isinstance(size, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"max_shard_size={size!r} is not a size: give bytes (> 0) or a string such as '5GB' or '500MiB'")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
