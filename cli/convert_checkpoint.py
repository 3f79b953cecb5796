"""``moefx convert CHECKPOINT_DIR|HUB_ID``: a transformers checkpoint converted on the meta device and
written tensor by tensor (``moefx.converting``), so memory stays bounded whatever the model's size."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moefx.artifact.checkpoint_source import (
    CheckpointError,
    checkpoint_dtype,
    meta_model,
    open_checkpoint,
    token_inputs,
)
from moefx.artifact.format import read_manifest
from moefx.artifact.streaming import convert_on_meta
from moefx.cli.checks import CLIError
from moefx.cli.views import make_console, summary_table
from moefx.converting import load_to_adopt, write_converted
from moefx.model import parameter_counts
from moefx.passes.capture import CaptureError
from moefx.passes.driver import NoFFNFound
from moefx.passes.options import ConversionOptions
from moefx.passes.rewrite import RewriteError


def run_convert_checkpoint(args: argparse.Namespace, options: ConversionOptions) -> int:
    from moefx.cli.convert import _count, _expert_sizes, _paths, _progress, _report_dry_run, refuse_output, shard_bytes

    if args.entry:
        raise CLIError(f"--entry names a builder in a Python model file; {args.model_py} is a checkpoint: leave it out",
                       code=2)
    max_shard_bytes = shard_bytes(args)
    out = Path(args.out or f"{Path(str(args.model_py).rstrip('/')).name}-{args.format}")
    refuse_output(out, args)
    with _progress(enabled=not args.json) as stage:
        stage("load")
        try:
            checkpoint = open_checkpoint(args.model_py)
        except CheckpointError as err:  # not a source moefx converts: a usage error
            raise CLIError(str(err), code=2) from err
        try:
            dtype = getattr(torch, args.dtype) if args.dtype else checkpoint_dtype(checkpoint)
            dense = meta_model(checkpoint.config, dtype)
            inputs = token_inputs(checkpoint.config, batch=args.batch, seq_len=args.seq_len)
        except CheckpointError as err:
            raise CLIError(str(err)) from err
        loaded = load_to_adopt(checkpoint, dense, dtype)  # existing MoE blocks: adopted from their weights
        if loaded is not None:
            return _adopt_in_memory(args, options, checkpoint, loaded, dtype, out, stage)
        before = parameter_counts(dense)
        stage("capture")
        try:
            meta = convert_on_meta(dense, options, inputs)
        except (NoFFNFound, RewriteError, CaptureError, CheckpointError, ValueError) as err:
            raise CLIError(f"{err}; nothing written") from err
        if args.dry_run:
            planned = (meta.conversion, parameter_counts(meta.converted), meta.converted)
            return _report_dry_run(args, checkpoint.directory, dense, meta.found, planned, before)
        stage("write")
        try:
            write_converted(meta, checkpoint, out, dtype=dtype, format=args.format, max_shard_bytes=max_shard_bytes,
                            force=args.force)
        except (CheckpointError, ValueError) as err:
            raise CLIError(f"{err}; nothing written") from err
    if args.json:
        described = read_manifest(out) if args.format == "moefx" else {"format": "hf"}
        print(json.dumps({"output": str(out.absolute()), **described}, indent=2))
        return 0
    after = parameter_counts(meta.converted)
    conversion = meta.conversion
    rows = [
        ("model", f"{type(dense).__name__} from {checkpoint.hub_id or checkpoint.directory}"),
        ("converted", _paths([c.path for c in conversion.converted])),
        ("not converted", _paths([p for p, _ in conversion.skipped]) if conversion.skipped else "none"),
        ("MoE", f"{args.experts} experts, top-{args.top_k}, gate {args.gate}, init {args.init}, "
                f"router init {options.router_init}"),
        ("parameters", f"{_count(before.total)} → {_count(after.total)}"),
        ("active per token", _count(after.active_per_token)),
        ("expert size", _expert_sizes(meta.converted)),
        ("output", f"{out.absolute()} ({args.format} format, {str(dtype).removeprefix('torch.')})"),
    ]
    make_console().print(summary_table("moefx convert", rows))
    return 0



def _adopt_in_memory(args, options: ConversionOptions, checkpoint, model, dtype, out: Path, stage) -> int:
    """A checkpoint with existing MoE blocks (Mixtral, Qwen-MoE, ...), loaded whole by ``load_to_adopt``
    (a streamed conversion on the meta device never holds the weights adoption reads), converted as a
    model file is. The manifest records the checkpoint's config, so ``moefx.load`` rebuilds it alone."""
    from moefx.cli.convert import convert_in_memory

    inputs = token_inputs(checkpoint.config, batch=args.batch, seq_len=args.seq_len, device="cpu")  # real tensors
    return convert_in_memory(args, options, model, inputs, None, stage, out=out, source=checkpoint.source(dtype),
                             label=str(checkpoint.hub_id or checkpoint.directory))
