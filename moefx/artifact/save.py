"""``moefx.save``: a converted model as a directory of ``moefx.json`` + ``model.safetensors``
(the format: ``moefx.artifact.format``), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from moefx.artifact.atomic import atomic_directory
from moefx.artifact.format import (
    MANIFEST,
    WEIGHTS,
    ArtifactError,
    manifest_for,
    write_manifest,
)
from moefx.artifact.tensors import unwrap
from moefx.model import is_expert_parallel, is_offloaded, moe_layers, named_tensors
from moefx.parallel.checkpoint import save_distributed
from moefx.passes.record import model_source


def save(model: nn.Module, out_dir: str | Path, *, force: bool = False, source: dict | None = None) -> Path:
    """Write ``model`` to ``out_dir`` atomically; returns the directory.

    ``source`` (``{"file": ..., "entry": ..., "dtype": ...}``) lets ``load(out_dir)`` rebuild the
    dense model by itself; without it, ``load`` needs the dense model passed in. An expert-parallel
    model is saved by every rank together (``moefx.parallel.checkpoint``: call it on all ranks,
    with ``out_dir`` on a shared filesystem); any other model is written by the calling process
    alone (under DDP, call it on one rank). ``force`` replaces only an earlier moefx output.
    """
    model = unwrap(model)
    if is_offloaded(model):
        raise ArtifactError("an offloaded model holds only some of its experts: save the model before moefx.offload")
    if next(moe_layers(model), None) is None:
        raise ArtifactError(
            f"{type(model).__name__} has no MoE layer, so there is nothing for moefx.load to rebuild: convert it "
            "first with moefx.moefy(model, ...), or save a dense model with safetensors"
        )
    tensors = _named_tensors(model)
    source = source if source is not None else model_source(model)  # a loaded model keeps its file
    if source is not None and source.get("file"):  # also relative to the output: a project moved whole
        source = {**source, "file_from_output": os.path.relpath(source["file"], Path(out_dir).absolute())}
    manifest = manifest_for(model, source)
    if is_expert_parallel(model):
        return save_distributed(model, out_dir, tensors, manifest, force)
    with atomic_directory(out_dir, force=force, marker=MANIFEST) as tmp:
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        write_manifest(tmp, manifest)
    return Path(out_dir)


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers (non-persistent ones too: a meta model has no other source for
    them) by name, each tensor once; safetensors wants them contiguous and not sharing memory."""
    tensors, storages = {}, set()
    for name, t in named_tensors(model):
        if t.is_meta:
            raise ArtifactError(f"{name} is on the meta device: materialise the weights (load them) before saving")
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in storages:  # a view of another saved tensor
            t = t.clone()
        storages.add(key)
        tensors[name] = t
    return tensors

