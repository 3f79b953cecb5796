"""Where offloaded expert weights live between uses: host memory, or a safetensors file on disk.

Legend: E experts, W in_proj rows (2H for a gated expert, else H), D model dim, H hidden dim.

An expert of one layer is up to four tensors, ``in_proj [W, D]``, ``out_proj [D, H]`` and the
optional ``in_bias [W]`` and ``out_bias [D]``: row ``e`` of the layer's stacked ``[E, ...]``
tensors. ``ExpertLayout`` says where each one sits inside a slot (a flat byte buffer);
a store's ``read_into`` fills a slot with one expert.

``DiskExpertStore`` reads the file with ``os.preadv`` straight into the slot's memory (through a
pinned staging buffer for a GPU slot) instead of memory-mapping it: mapped pages a process has
touched count in its resident set until the kernel reclaims them, so mapping would let the
expert weights pile up in RSS; reads leave them in the page cache, which is the kernel's to drop.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moefx.artifact.format import DTYPES, INDEX, WEIGHTS, ArtifactError, TensorBytes, tensor_offsets, weight_files
from moefx.layer.experts import EXPERT_PARAMETERS as PARTS  # an expert's tensors, by name

_ALIGN = 64  # bytes: every part of a slot starts aligned for any dtype and for vector loads


class OffloadError(RuntimeError):
    """Expert weights that cannot be found or read where ``moefx.offload`` was told they are."""


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes of one expert's tensors (the stacked tensors without their leading E) and their
    byte offsets in a slot."""

    dtype: torch.dtype
    shapes: dict[str, tuple[int, ...]]  # part -> shape of one expert's tensor
    offsets: dict[str, int]  # part -> byte offset in the slot

    @classmethod
    def of(cls, stacked: dict[str, Tensor]) -> ExpertLayout:
        dtype = stacked["in_proj"].dtype
        shapes, offsets, end = {}, {}, 0
        for part, t in stacked.items():
            shapes[part], offsets[part] = tuple(t.shape[1:]), end
            end += _aligned(t[0].numel() * dtype.itemsize)
        return cls(dtype, shapes, offsets)

    def part_bytes(self, part: str) -> int:
        return math.prod(self.shapes[part]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes one expert moves (its tensors, without the alignment padding)."""
        return sum(self.part_bytes(p) for p in self.shapes)

    @property
    def slot_bytes(self) -> int:
        """Bytes one expert takes in a slot (with padding)."""
        return sum(_aligned(self.part_bytes(p)) for p in self.shapes)

    def raw_views(self, slot_u8: Tensor) -> dict[str, Tensor]:
        """Each part's bytes in a slot, as uint8 tensors."""
        return {p: slot_u8[self.offsets[p]: self.offsets[p] + self.part_bytes(p)] for p in self.shapes}

    def views(self, slot_u8: Tensor) -> dict[str, Tensor]:
        """Each part in a slot, typed and shaped: the expert's weights, ready for the grouped linear."""
        return {p: raw.view(self.dtype).view(self.shapes[p]) for p, raw in self.raw_views(slot_u8).items()}


def stacked_expert_tensors(experts) -> dict[str, Tensor]:
    """A ``GroupedExperts``' stacked tensors by part name (biases only when it has them)."""
    return {p: getattr(experts, p) for p in PARTS if getattr(experts, p) is not None}


class HostExpertStore:
    """Expert weights in host memory: the layers' own stacked tensors, moved to the CPU (and
    pinned, when the slots are on a GPU, so copies can run asynchronously). No other copy."""

    def __init__(self, layers: list[dict[str, Tensor]], layouts: list[ExpertLayout], *, pin: bool) -> None:
        self.layouts, self.layers = layouts, []
        for stacked in layers:
            held = {}
            for part, t in stacked.items():
                t = t.detach().to("cpu")
                held[part] = t.pin_memory() if pin else t
            self.layers.append(held)

    def read_into(self, layer: int, expert: int, slot_u8: Tensor) -> None:
        for part, dest in self.layouts[layer].views(slot_u8).items():
            dest.copy_(self.layers[layer][part][expert], non_blocking=dest.is_cuda)

    def close(self) -> None:
        self.layers = []


@dataclass(frozen=True)
class _FileTensor:
    file: Path
    name: str
    begin: int  # byte offset of the stacked tensor's data in the file
    expert_bytes: int  # bytes of one expert's row of it


class DiskExpertStore:
    """Expert weights in safetensors files, read on demand; nothing of them stays in memory."""

    def __init__(self, index: SafetensorsIndex, layer_names: list[dict[str, str]], layouts: list[ExpertLayout],
                 num_experts: list[int], *, staging_bytes: int, device: torch.device) -> None:
        self.layouts, self.layers = layouts, []
        for names, layout, E in zip(layer_names, layouts, num_experts):
            self.layers.append({
                part: index.locate(name, layout.dtype, (E, *layout.shapes[part])) for part, name in names.items()
            })
        self._files = {f: os.open(f, os.O_RDONLY) for f in {t.file for layer in self.layers for t in layer.values()}}
        self._staging = None
        if device.type != "cpu":  # reads land in pinned host memory, then copy to the device
            self._staging = torch.empty(staging_bytes, dtype=torch.uint8).pin_memory()

    def read_into(self, layer: int, expert: int, slot_u8: Tensor) -> None:
        layout = self.layouts[layer]
        dests = layout.raw_views(slot_u8)
        staged = layout.raw_views(self._staging) if self._staging is not None else dests
        for part, where in self.layers[layer].items():
            self._read(where, where.begin + expert * where.expert_bytes, staged[part])
            if staged is not dests:
                dests[part].copy_(staged[part], non_blocking=True)

    def _read(self, where: _FileTensor, offset: int, target_u8: Tensor) -> None:
        buffer = memoryview(target_u8.numpy())
        done = 0
        while done < len(buffer):
            n = os.preadv(self._files[where.file], [buffer[done:]], offset + done)
            if n == 0:
                raise OffloadError(
                    f"{where.file} ends before the data of tensor {where.name!r} does: the file was truncated "
                    "after moefx.offload opened it; write it again (moefx convert / moefx.save)"
                )
            done += n

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files = {}


class SafetensorsIndex:
    """Where each tensor's bytes are in a safetensors file, or in the files of a sharded checkpoint
    (a directory with ``model.safetensors`` or ``model.safetensors.index.json``)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path
        if path.is_dir():
            files = _directory_files(path)
        elif path.is_file():
            files = [path]
        else:
            raise OffloadError(f"the weights file {path} does not exist: pass path= a moefx convert output or a .safetensors file")
        self.entries: dict[str, TensorBytes] = {}
        for file in files:
            if not file.is_file():
                raise OffloadError(f"the weights file {file} (listed in {path}) does not exist")
            try:
                self.entries.update(tensor_offsets(file))
            except ArtifactError as err:  # a file cut short: the offload's error, with the same message
                raise OffloadError(str(err)) from err

    def locate(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> _FileTensor:
        """The file and offset of tensor ``name``, checked to be ``dtype`` and ``shape`` and complete."""
        if name not in self.entries:
            raise OffloadError(f"tensor {name!r} is missing from {self.path}: is it the output this model was converted to?")
        entry = self.entries[name]
        if DTYPES.get(entry.dtype) != dtype or entry.shape != shape:
            raise OffloadError(
                f"tensor {name!r} in {entry.file} is {entry.dtype} {entry.shape}, but the model's is {dtype} {shape}: "
                "offload the model the file was saved from (same options and dtype)"
            )
        return _FileTensor(entry.file, name, entry.begin, (entry.end - entry.begin) // shape[0])


def _directory_files(directory: Path) -> list[Path]:
    if not ((directory / WEIGHTS).is_file() or (directory / INDEX).is_file()):
        raise OffloadError(f"{directory} holds neither {WEIGHTS} nor {INDEX}: pass a moefx convert output")
    return weight_files(directory)
