"""``moefx.convert``: a model file or a transformers checkpoint in, a converted model on disk out.

    moefx.convert("./llama-dense", "./llama-moe", num_experts=8, top_k=2)                  # moefx format
    moefx.convert("./llama-dense", "./mixtral", format="hf", max_shard_size="5GB", ...)   # native MoE

A checkpoint (a ``save_pretrained`` directory, or a hub id in the local Hugging Face cache) is
converted in bounded memory: the model is built and converted on the meta device, then each
tensor is read from the memory-mapped files, or each MoE layer built from its FFN, as it is
written (``moefx.artifact.streaming``). A model file (``build_model()``) is converted in memory, and
so is a checkpoint with existing MoE blocks (Mixtral, Qwen-MoE, ...): adopting a block reads its
weights, which a conversion on meta never holds (``load_to_adopt``; ``moefx convert`` does the same).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from moefx.artifact.atomic import atomic_directory, refuse_existing
from moefx.artifact.checkpoint_source import (
    Checkpoint,
    checkpoint_dtype,
    is_checkpoint_source,
    meta_model,
    model_class,
    open_checkpoint,
    token_inputs,
)
from moefx.artifact.format import MANIFEST, manifest_for, write_manifest
from moefx.artifact.model_file import load_model_file
from moefx.artifact.save import save
from moefx.artifact.shards import parse_size, write_shards
from moefx.artifact.streaming import MetaConversion, convert_on_meta, stream_plan
from moefx.passes.adopt import block_paths
from moefx.passes.driver import conversion_options, moefy

log = logging.getLogger(__name__)

FORMATS = ("moefx", "hf")
MARKERS = {"moefx": MANIFEST, "hf": "config.json"}  # the file that shows a directory is an earlier output


def convert(
    source: str | Path, out_dir: str | Path, *, format: str = "moefx", max_shard_size: int | str | None = None,
    batch: int = 1, seq_len: int = 16, dtype: torch.dtype | str | None = None, entry: str | None = None,
    force: bool = False, **moefy_options,
) -> Path:
    """Convert ``source`` and write it to ``out_dir`` (atomically); returns ``out_dir``.

    ``source``: a Python model file (``build_model()``, optional ``example_inputs()``; ``entry``
    names another builder), a transformers checkpoint directory, or a hub id in the local Hugging
    Face cache. ``format``: ``"moefx"`` (``moefx.load`` reads it back) or ``"hf"`` (a native
    transformers MoE checkpoint). ``max_shard_size``: bytes, or a string such as ``"5GB"``.
    ``batch``/``seq_len``: the token ids the passes trace a checkpoint's model with. ``dtype``:
    the dtype to convert in (default: the checkpoint's, or the model file's as built).
    ``moefy_options``: ``moefx.moefy``'s (``num_experts``, ``top_k``, ``init``, ``gate``, ``seed``, ...).
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is unknown: choose one of {list(FORMATS)}")
    options = conversion_options(**{"num_experts": 8, "top_k": 2, **moefy_options})  # checked before any work
    shard_bytes = parse_size(max_shard_size)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    refuse_existing(Path(out_dir).absolute(), force, marker=MARKERS[format])
    if not is_checkpoint_source(source):
        return _convert_model_file(Path(source), Path(out_dir), format, shard_bytes, dtype, entry, force, moefy_options)
    checkpoint = open_checkpoint(source)
    dtype = dtype or checkpoint_dtype(checkpoint)
    dense = meta_model(checkpoint.config, dtype)
    loaded = load_to_adopt(checkpoint, dense, dtype)
    if loaded is not None:
        return _convert_loaded(loaded, checkpoint, Path(out_dir), format, shard_bytes, dtype, force, batch, seq_len,
                               moefy_options)
    meta = convert_on_meta(dense, options, token_inputs(checkpoint.config, batch=batch, seq_len=seq_len))
    return write_converted(meta, checkpoint, Path(out_dir), dtype=dtype, format=format, max_shard_bytes=shard_bytes,
                           force=force)


def write_converted(
    meta: MetaConversion, checkpoint: Checkpoint, out_dir: Path, *, dtype: torch.dtype, format: str = "moefx",
    max_shard_bytes: int | None = None, force: bool = False,
) -> Path:
    """Write a checkpoint converted on meta (``convert_on_meta``), streaming its tensors."""
    if format == "hf":
        write_native = native_writer()
        names = list(meta.converted.state_dict().keys())
        plan = stream_plan(meta, checkpoint.tensors, names)
        return Path(write_native(meta.converted, out_dir, plan=plan, max_shard_size=max_shard_bytes,
                                 source_dir=checkpoint.directory, force=force))
    plan = stream_plan(meta, checkpoint.tensors)
    source = checkpoint.source(dtype)
    source["checkpoint_from_output"] = os.path.relpath(source["checkpoint"], out_dir.absolute())
    with atomic_directory(out_dir, force=force, marker=MANIFEST) as tmp:
        write_shards(plan, tmp, max_shard_bytes=max_shard_bytes)
        write_manifest(tmp, manifest_for(meta.converted, source))
    log.info("wrote %d tensors to %s", len(plan), out_dir)
    return out_dir


def load_to_adopt(checkpoint: Checkpoint, dense_on_meta: nn.Module, dtype: torch.dtype) -> nn.Module | None:
    """The checkpoint's model loaded whole (memory: the model once), in eval mode, when its model
    (``dense_on_meta``, built by ``meta_model``) has existing MoE blocks; None when it has none and
    so streams. Adoption checks each block on its real weights and builds the moefx layer from them."""
    if not block_paths(dense_on_meta):
        return None
    log.warning("%s has existing MoE blocks: adopting them needs their weights, so it is loaded in memory, "
                "not streamed", checkpoint.directory)
    return model_class(checkpoint.config).from_pretrained(checkpoint.directory, dtype=dtype).eval()


def _convert_loaded(model: nn.Module, checkpoint: Checkpoint, out_dir: Path, format: str, shard_bytes, dtype,
                    force: bool, batch: int, seq_len: int, moefy_options) -> Path:
    """A checkpoint loaded by ``load_to_adopt``: its blocks adopted, its dense FFNs (if any) converted,
    written as a model file's is. The manifest records the checkpoint, so ``moefx.load`` rebuilds it alone."""
    if format == "moefx" and shard_bytes is not None:
        raise ValueError(f"max_shard_size applies to a checkpoint streamed or written with format='hf'; "
                         f"{checkpoint.directory} has MoE blocks, so its moefx output is one file: leave it out")
    inputs = token_inputs(checkpoint.config, batch=batch, seq_len=seq_len, device="cpu")  # real tensors
    moefy(model, example_inputs=inputs, **moefy_options)  # an adopted block keeps its own expert count
    if format == "hf":
        return Path(native_writer()(model, out_dir, max_shard_size=shard_bytes, source_dir=checkpoint.directory,
                                    force=force))
    return save(model, out_dir, force=force, source=checkpoint.source(dtype))


def _convert_model_file(path: Path, out_dir: Path, format: str, shard_bytes, dtype, entry, force, moefy_options) -> Path:
    built = load_model_file(path, entry)
    model = built.model
    if dtype is not None:
        model.to(dtype)
    moefy(model, example_inputs=built.example_args, example_kwargs=built.example_kwargs, **moefy_options)
    if format == "hf":
        return Path(native_writer()(model, out_dir, max_shard_size=shard_bytes, force=force))
    if shard_bytes is not None:
        raise ValueError("max_shard_size applies to checkpoint sources and format='hf'; a model file's moefx output "
                         "is one file: leave it out")
    source = {"file": str(built.path), "entry": built.entry, "dtype": str(dtype).removeprefix("torch.") if dtype else None}
    return save(model, out_dir, force=force, source=source)


def native_writer():
    try:
        from moefx.artifact.hf_native import write_native
    except ImportError as err:
        raise ValueError("format='hf' is not available in this moefx: use format='moefx'") from err
    return write_native
