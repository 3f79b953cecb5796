"""Saving and loading a model across ranks with ``torch.distributed.checkpoint`` (DCP).

``moefx.save`` on more than one rank comes here: every rank calls it, each writes the shards
it holds (an expert-parallel layer's experts as ``Shard(0)`` of a DTensor over the ``(dp, ep)``
mesh; replicated tensors are written once), and DCP's Hugging Face writer consolidates them into
safetensors files with an index, so the directory holds whole tensors:

    out/
      moefx.json                         as for a single-process save
      model-00001-of-0000N.safetensors   full tensors, safetensors only (no pickle anywhere)
      model.safetensors.index.json       tensor name → file
      model-integer-tensors.safetensors  integer and bool tensors (position ids), written by rank 0

``moefx.load`` into an expert-parallel model reads only this rank's slices, whatever EP size the
checkpoint was saved at (DCP reshards); a single process reads the files whole. The directory is
written atomically by rank 0 (a temporary directory, renamed at the end), so a save that dies
midway leaves the previous checkpoint as it was.

The save is collective: before anything is written, every rank checks in through the process
group's store and waits at most ``MOEFX_SAVE_CHECK_IN_TIMEOUT`` seconds (default 120) for the
others. A save called on some ranks only (rank 0 alone: the DDP habit) is then an error on each
rank that called it, saying so, with nothing written, instead of a hang or a gloo
"Connection closed by peer" on the ranks that did not. ``write_collectively`` is the protocol,
also used by ``moefx.parallel.resume`` for training checkpoints.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from moefx.artifact.atomic import atomic_directory, refuse_existing
from moefx.artifact.format import MANIFEST, PLAIN_WEIGHTS, add_to_index, read_tensors, tensor_specs, write_manifest
from moefx.model import moe_layers, named_tensors


class CheckpointError(RuntimeError):
    """A distributed save failed; raised on every rank, and nothing was written."""


CHECK_IN_TIMEOUT_ENV = "MOEFX_SAVE_CHECK_IN_TIMEOUT"


def save_distributed(model: nn.Module, out_dir: str | Path, tensors: dict[str, Tensor], manifest: dict, force: bool) -> Path:
    """Every rank calls this, with ``out_dir`` on a filesystem they all see; returns when the
    checkpoint is complete on disk, or raises on every rank."""
    check_in("moefx.save")
    state, plain = split_plain(as_global(model, tensors))

    def finish(tmp: Path) -> None:  # rank 0, once every shard is written
        if plain:
            write_plain(tmp, plain)
        write_manifest(tmp, manifest)

    write_collectively(Path(out_dir).absolute(), state, finish, force=force, marker=MANIFEST)
    return Path(out_dir).absolute()


def check_in(what: str, timeout_s: float | None = None) -> None:
    """Returns once every rank has called it (for the same ``what``); raises ``CheckpointError`` on
    a rank that waited ``timeout_s`` (default: ``$MOEFX_SAVE_CHECK_IN_TIMEOUT`` or 120 s) in vain.
    Through the store, not a collective: a rank that never comes leaves no half-done exchange."""
    if timeout_s is None:
        timeout_s = float(os.environ.get(CHECK_IN_TIMEOUT_ENV, "120"))
    store = dist.distributed_c10d._get_default_store()
    world = dist.get_world_size()
    key = f"moefx/check_in/{what}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    arrived = store.add(key, 1)
    goal = ((arrived - 1) // world + 1) * world  # calls come in rounds of one per rank
    deadline = time.monotonic() + timeout_s
    while (present := store.add(key, 0)) < goal:
        if time.monotonic() > deadline:
            store.add(key, -1)  # withdraw, so that a later save by every rank counts right
            raise CheckpointError(
                f"{what} is collective: every rank must call it, but rank {dist.get_rank()} waited {timeout_s:g} s and "
                f"only {present - (goal - world)} of the {world} ranks came. Call it on every rank (not only on rank 0, "
                f"as with DDP), at the same point of the program. Nothing was written. (The wait: ${CHECK_IN_TIMEOUT_ENV}.)"
            )
        time.sleep(0.01)


def write_collectively(target: Path, state: dict[str, Tensor], finish: Callable[[Path], None], *, force: bool,
                       marker: str) -> None:
    """Every rank writes its part of ``state`` with DCP into a temporary directory that rank 0
    made; rank 0 then calls ``finish(tmp)`` (files of its own, the ``marker`` last) and renames
    it to ``target``. Returns on every rank once ``target`` is complete, or raises on every rank."""
    if dist.get_rank() != 0:
        tmp = _receive()
        try:
            dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(tmp, save_distributed=True, enable_consolidation=True))
        finally:
            _receive()  # rank 0 always sends its outcome once the save is over: wait for it, even after a failure
        return
    try:
        refuse_existing(target, force, marker)
    except FileExistsError as err:
        _send(err)
        raise
    try:
        with atomic_directory(target, force=force, marker=marker) as tmp:
            _send(str(tmp))
            writer = dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True, enable_consolidation=True)
            dcp.save(state, storage_writer=writer)
            shutil.rmtree(tmp / "sharded", ignore_errors=True)  # consolidated: the per-rank files are copies
            finish(tmp)
    except KeyboardInterrupt:
        _send(CheckpointError(f"the checkpoint {target} was interrupted on rank 0; nothing written"))
        raise
    except BaseException as err:  # DCP's CheckpointException is a BaseException: every rank gets one error type
        error = CheckpointError(f"the checkpoint {target} could not be written: {err}")
        _send(error)
        raise error from err
    _send("done")


def load_distributed(model: nn.Module, out_dir: str | Path, tensors: dict[str, Tensor],
                     owners: dict[str, str] | None = None) -> None:
    """Fill ``tensors`` (the model's own, by name, or shaped like those ``owners`` names: see
    ``as_global``) in place with this rank's part of the checkpoint."""
    state, plain = split_plain(as_global(model, tensors, owners))
    specs = tensor_specs(Path(out_dir))
    missing = sorted(plain.keys() - specs.keys())
    if missing:  # checked before anything is filled in
        raise CheckpointError(f"{out_dir} lacks the model's tensors {missing[:5]}: pass the model it was saved from")
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(out_dir)))
    for name, value in read_tensors({name: specs[name].file for name in plain}).items():
        plain[name].copy_(value)


def split_plain(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """DCP's tensors, and the integer and bool ones (position ids, say), which its Hugging Face
    writer cannot consolidate (it asks torch.finfo for every dtype), and the 0-dim ones (an Adam
    step count), which its reader leaves unfilled. Those are never expert shards: rank 0 writes
    them to a file of their own."""
    plain = {n: t for n, t in state.items()
             if not isinstance(t, DTensor) and (t.dim() == 0 or not (t.is_floating_point() or t.is_complex()))}
    return {n: t for n, t in state.items() if n not in plain}, plain


def write_plain(directory: Path, plain: dict[str, Tensor]) -> None:
    save_file({n: t.contiguous() for n, t in plain.items()}, directory / PLAIN_WEIGHTS, metadata={"format": "pt"})
    add_to_index(directory, plain, PLAIN_WEIGHTS)


def as_global(model: nn.Module, tensors: dict[str, Tensor], owners: dict[str, str] | None = None) -> dict[str, Tensor]:
    """Expert shards as DTensors over their mesh (sharing this rank's storage); the rest as is.
    ``owners`` maps a name of ``tensors`` to the model tensor it is shaped like (an optimizer state
    of an expert weight: a shard the same way); by default each name is the model's own."""
    meshes = {}
    for _, layer in moe_layers(model):
        if layer.dispatcher.mesh is not None:  # an expert-parallel layer's experts: shards over its mesh
            for param in layer.experts.parameters(recurse=False):
                meshes[id(param)] = layer.dispatcher.mesh
    named = dict(named_tensors(model))
    state = {}
    for name, tensor in tensors.items():
        owner = named.get(owners.get(name, name) if owners else name)
        mesh = meshes.get(id(owner))
        if mesh is None or tensor.shape != owner.shape:  # a 0-dim step count of an expert weight: the same on every rank
            state[name] = tensor
            continue
        placements = [Shard(0) if dim == "ep" else Replicate() for dim in mesh.mesh_dim_names]  # dp: same experts
        global_shape = (tensor.shape[0] * mesh["ep"].size(), *tensor.shape[1:])
        state[name] = DTensor.from_local(tensor, mesh, placements, run_check=False, shape=torch.Size(global_shape),
                                         stride=torch.empty(global_shape, device="meta").stride())
    return state


def _send(value) -> None:
    dist.broadcast_object_list([value], src=0)


def _receive():
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]
