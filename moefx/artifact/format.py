"""The on-disk format of a moefx output, in one place: its file names, its manifest, and the one
reader of its safetensors files.

    out/
      moefx.json                          the manifest (``manifest_for``): versions, the model file and
                                          entry (when known), every conversion, the MoE layers,
                                          parameter counts
      model.safetensors                   every tensor, tied ones once (a single-process save)
    or, from a distributed save (``moefx.parallel.checkpoint``):
      model-00001-of-0000N.safetensors    full tensors
      model.safetensors.index.json        tensor name → file
      model-integer-tensors.safetensors   integer and bool tensors

Weights are read only through safetensors, never pickle: ``tensor_specs`` (names, shapes, dtypes,
from the headers alone) and ``read_tensors`` for whole tensors, ``tensor_offsets`` for the byte
ranges that ``moefx.offload`` reads itself.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from moefx.model import moe_layers, parameter_counts
from moefx.passes.record import conversions
from moefx.version import __version__

MANIFEST = "moefx.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # weights in several files (a distributed save)
PLAIN_WEIGHTS = "model-integer-tensors.safetensors"  # in a distributed save, the tensors DCP cannot write
FORMAT_VERSION = 1

DTYPES = {  # safetensors' dtype names
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}


class ArtifactError(RuntimeError):
    """A moefx output directory that cannot be read back, or a model that does not fit it."""


# The manifest.

def manifest_for(model: nn.Module, source: dict | None = None) -> dict:
    counts = parameter_counts(model)
    return {
        "format": "moefx", "format_version": FORMAT_VERSION,
        "moefx_version": __version__, "torch_version": torch.__version__.split("+")[0],
        "source": source,
        "conversions": [c.as_dict() for c in conversions(model)],
        "moe_layers": [layer_entry(path, layer) for path, layer in moe_layers(model)],
        "parameters": {"total": counts.total, "active_per_token": counts.active_per_token, "per_expert": counts.expert},
    }


def layer_entry(path: str, layer) -> dict:
    """One MoE layer as the manifest lists it (and as ``load`` checks a converted model against)."""
    c = layer.config
    return {
        "path": path, "kind": "glu" if c.gated else "mlp", "d_model": c.d_model, "d_hidden_per_expert": c.d_hidden,
        "num_experts": c.num_experts, "top_k": c.top_k, "gate": c.gate, "capacity_factor": c.capacity_factor,
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not (out_dir.exists() or out_dir.is_symlink()):
        raise ArtifactError(f"{out_dir} does not exist: pass the directory that moefx convert (-o) or moefx.save wrote")
    if not path.is_file() or not ((out_dir / WEIGHTS).is_file() or (out_dir / INDEX).is_file()):
        raise ArtifactError(
            f"{out_dir} is not a moefx output: it needs {MANIFEST} and {WEIGHTS} (or {INDEX}), made by moefx convert "
            "or moefx.save"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}): write the output again (moefx convert / moefx.save)") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} holds a JSON {type(manifest).__name__}, not moefx's record: write the output again")
    if manifest.get("format") != "moefx" or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; this moefx "
            f"reads 'moefx' version {FORMAT_VERSION}"
        )
    return manifest


# The weight files.

def weight_files(out_dir: Path) -> list[Path]:
    """The output's safetensors files: the one file, or those its index lists."""
    if (out_dir / WEIGHTS).is_file():
        return [out_dir / WEIGHTS]
    return [out_dir / name for name in sorted(set(_weight_map(out_dir).values()))]


def add_to_index(directory: Path, names, file: str) -> None:
    """Record in the index that the tensors ``names`` are in ``file``."""
    index = json.loads((directory / INDEX).read_text())
    index["weight_map"].update(dict.fromkeys(names, file))
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _weight_map(out_dir: Path) -> dict[str, str]:
    return json.loads((out_dir / INDEX).read_text())["weight_map"]


class TensorSpec(NamedTuple):
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name (``DTYPES``)


def tensor_specs(out_dir: Path) -> dict[str, TensorSpec]:
    """Every saved tensor's file, shape and dtype, by name, read from the files' headers (no data)."""
    specs = {}
    for file in weight_files(out_dir):
        with _opened(file) as f:
            for name in f.keys():
                part = f.get_slice(name)
                specs[name] = TensorSpec(file, tuple(part.get_shape()), part.get_dtype())
    return specs


def read_tensors(files: Mapping[str, Path]) -> dict[str, Tensor]:
    """The tensors named, each read whole from its file (on the CPU; each file opened once)."""
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    tensors = {}
    for file, names in by_file.items():
        with _opened(file) as f:
            tensors.update((name, f.get_tensor(name)) for name in names)
    return tensors


@contextmanager
def _opened(file: Path) -> Iterator:
    """A weights file, open; one that safetensors cannot read is an ArtifactError naming it."""
    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{file} cannot be read ({err}): write the output again (moefx convert / moefx.save)") from err
    with handle as f:
        yield f


class TensorBytes(NamedTuple):
    file: Path
    dtype: str  # safetensors' name (``DTYPES``)
    shape: tuple[int, ...]
    begin: int  # byte offsets of the tensor's data in the file
    end: int


def tensor_offsets(file: Path) -> dict[str, TensorBytes]:
    """Where each tensor's data is in a safetensors file, checked to be inside the file.

    The header is parsed here by hand, not by safetensors, because safetensors does not give the
    byte offsets: ``moefx.offload`` needs them to read one expert's rows with ``os.preadv``
    instead of memory-mapping the file (see ``moefx.offloading.store``)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if 8 + n > size:
            raise ArtifactError(f"{file} is not a complete safetensors file: its header runs past its end ({size} bytes)")
        header = json.loads(f.read(n))
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    offsets = {}
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][1]):
        begin, end = (8 + n + offset for offset in entry["data_offsets"])
        if end > size:
            raise ArtifactError(
                f"{file} is truncated: tensor {name!r} ends at byte {end} but the file has {size} bytes; write it again "
                "(moefx convert / moefx.save)"
            )
        offsets[name] = TensorBytes(file, entry["dtype"], tuple(entry["shape"]), begin, end)
    return offsets
