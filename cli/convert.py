"""``moefx convert MODEL_PY --experts N``: load, capture, match, rewrite, write; then a summary (a checkpoint
source goes to ``convert_checkpoint``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from moefx.artifact.atomic import refuse_existing
from moefx.artifact.checkpoint_source import is_checkpoint_source
from moefx.artifact.format import read_manifest
from moefx.artifact.model_file import ModelFile, ModelFileError, load_model_file
from moefx.artifact.save import save
from moefx.artifact.tensors import meta_twins
from moefx.cli.calibration import check_calibration_flag, read_calibration
from moefx.cli.checks import CLIError, check_model_file, options_from_args
from moefx.cli.views import count_text, make_console, summary_table
from moefx.converting import MARKERS
from moefx.model import expert_size, moe_layers, parameter_counts
from moefx.passes.capture import CaptureError
from moefx.passes.driver import ConversionOptions, NoFFNFound, convert_found, search
from moefx.passes.rewrite import RewriteError

STAGES = {"load": "loading the model file", "capture": "capturing the graph", "match": "matching FFNs",
          "rewrite": "rewriting FFNs as MoE", "write": "writing"}


def run_convert(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    check_calibration_flag(args, options.router_init)
    if is_checkpoint_source(args.model_py):  # streamed; it refuses router_init kmeans (a forward over real weights)
        from moefx.cli.convert_checkpoint import run_convert_checkpoint

        return run_convert_checkpoint(args, options)
    _check_shard_size(args)
    file = check_model_file(args.model_py)
    out = Path(args.out or f"{file.stem}-moefx")
    if not args.dry_run:
        try:
            refuse_existing(out.absolute(), args.force, marker=MARKERS[args.format])
        except FileExistsError as err:
            raise CLIError(str(err), code=2) from None
    with _progress(enabled=not args.json) as stage:
        stage("load")
        built = _load(file, args.entry)
        model, inputs, kwargs = built.model, built.example_args, built.example_kwargs
        if args.dtype:
            model.to(getattr(torch, args.dtype))
            inputs, kwargs = cast_inputs(inputs, args.dtype), cast_inputs(kwargs, args.dtype)
        before = parameter_counts(model)
        found = _search(model, built, stage)
        if not found.matches:
            hint = f" (rejected candidates: {len(found.rejected)}; moefx inspect {args.model_py} shows why)" if found.rejected else ""
            raise CLIError(f"no feed-forward block found in {file.name} ({type(model).__name__}); nothing written{hint}")
        calibration = None
        if args.calibration:
            tokenizer_dir = file if file.is_dir() else None  # a checkpoint directory has its tokenizer
            calibration = read_calibration(args.calibration, model, inputs or (), kwargs or {}, tokenizer_dir)
        if args.dry_run:
            planned = _dry_run(model, found, options, inputs, kwargs, stage)
            return _report_dry_run(args, file, model, found, planned, before)
        try:
            conversion = convert_found(model, found, options, example_inputs=inputs, example_kwargs=kwargs, on_stage=stage,
                                       calibration=calibration)
        except (NoFFNFound, RewriteError, ValueError) as err:
            raise CLIError(f"{err}; nothing written") from err
        stage("write")
        source = {"file": str(built.path), "entry": built.entry, "dtype": args.dtype}
        _write(model, out, args, source)
    if args.json:
        manifest = read_manifest(out) if args.format == "moefx" else {"format": "hf"}  # what was written
        print(json.dumps({"output": str(out.absolute()), **manifest}, indent=2))
        return 0
    after = parameter_counts(model)
    rows = [
        ("model", f"{type(model).__name__} from {file.name}:{built.entry}"),
        ("FFNs found", str(len(found.matches))),
        ("converted", _paths([c.path for c in conversion.converted])),
        ("not converted", _paths([p for p, _ in conversion.skipped]) if conversion.skipped else "none"),
        ("candidates rejected", str(len(found.rejected))),
        ("MoE", f"{args.experts} experts, top-{args.top_k}, gate {args.gate}, init {args.init}, "
                f"router init {options.router_init}"
                + (f" ({conversion.router_calibration})" if conversion.router_calibration else "")),
        ("parameters", f"{_count(before.total)} → {_count(after.total)}"),
        ("active per token", _count(after.active_per_token)),
        ("expert size", _expert_sizes(model)),
        ("output", str(out.absolute())),
    ]
    make_console().print(summary_table("moefx convert", rows))
    return 0


def _write(model, out: Path, args, source: dict) -> None:
    """The converted model in ``--format``: moefx's own directory, or a native transformers MoE checkpoint."""
    from moefx.artifact.shards import parse_size
    from moefx.converting import native_writer

    if args.format == "hf":
        try:
            native_writer()(model, out, max_shard_size=parse_size(args.max_shard_size), force=args.force)
        except ValueError as err:
            raise CLIError(f"{err}; nothing written") from err
        return
    save(model, out, force=args.force, source=source)


def _check_shard_size(args) -> None:
    from moefx.artifact.shards import parse_size

    try:
        parse_size(args.max_shard_size)
    except ValueError as err:
        raise CLIError(str(err).replace("max_shard_size=", "--max-shard-size "), code=2) from None
    if args.max_shard_size is not None and args.format == "moefx":
        raise CLIError("--max-shard-size applies to a checkpoint source or --format hf; a model file's moefx output is "
                       "one file: leave it out", code=2)


def _expert_sizes(model) -> str:
    sizes = sorted({expert_size(layer) for _, layer in moe_layers(model)})
    if len(sizes) == 1:
        return f"{_count(sizes[0])} parameters"
    return f"{_count(sizes[0])} to {_count(sizes[-1])} parameters, by layer"


def _load(file: Path, entry: str | None) -> ModelFile:
    try:
        return load_model_file(file, entry)
    except ModelFileError as err:
        raise CLIError(str(err)) from err


def _search(model, built: ModelFile, stage):
    try:
        return search(model, built.example_args, built.example_kwargs, on_stage=stage)
    except CaptureError as err:
        if built.example_args is None:
            raise CLIError(
                f"{built.path.name} defines no example_inputs() and torch.fx cannot trace {type(model).__name__} "
                f"without them ({_first_failure(err)}): define example_inputs() returning the forward's positional "
                "arguments as a tuple, or (args, kwargs)"
            ) from err
        raise CLIError(f"{err}; nothing written") from err


def _first_failure(err: CaptureError) -> str:
    lines = str(err).splitlines()
    return lines[1].strip() if len(lines) > 1 else lines[0]


def _dry_run(model, found, options: ConversionOptions, inputs, kwargs, stage):
    """The conversion done on a copy of ``model`` whose tensors are on the meta device: what
    converts and the parameter counts after, with no memory for weights, the model untouched and
    nothing written. Returns ``(conversion, counts after, the converted copy)``."""
    copy = deepcopy(model, meta_twins(model))  # tied tensors keep one twin
    try:
        conversion = convert_found(copy, found, options, example_inputs=inputs, example_kwargs=kwargs, on_stage=stage)
    except (NoFFNFound, RewriteError, ValueError) as err:
        raise CLIError(f"{err}; nothing written") from err
    return conversion, parameter_counts(copy), copy


def _report_dry_run(args, file: Path, model, found, planned, before) -> int:
    conversion, after, converted = planned
    if args.json:
        data = {
            "dry_run": True, "model": type(model).__name__, "source": str(file.absolute()),
            "convert": [c.path for c in conversion.converted],
            "skipped": [{"path": path, "reason": why} for path, why in conversion.skipped],
            "rejected": [{"path": r.path, "reason": r.reason} for r in found.rejected],
            "parameters_before": before.total,
            "parameters_after": after.total, "active_per_token": after.active_per_token, "per_expert": after.expert,
        }
        print(json.dumps(data, indent=2))
        return 0
    rows = [
        ("model", f"{type(model).__name__} from {file.name}"),
        ("FFNs found", str(len(found.matches))),
        ("would convert", _paths([c.path for c in conversion.converted]) or "none"),
        ("not converted", _paths([p for p, _ in conversion.skipped]) if conversion.skipped else "none"),
        ("candidates rejected", str(len(found.rejected))),
        ("MoE", f"{args.experts} experts, top-{args.top_k}, gate {args.gate}, init {args.init}"),
        ("parameters", f"{_count(before.total)} → {_count(after.total)}"),
        ("active per token", _count(after.active_per_token)),
        ("expert size", _expert_sizes(converted)),
        ("output", "dry run: nothing written"),
    ]
    make_console().print(summary_table("moefx convert --dry-run", rows))
    return 0


@contextmanager
def _progress(enabled: bool) -> Iterator:
    console = make_console(stderr=True)
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )
    with progress:
        task = progress.add_task("starting", total=len(STAGES))
        done = []

        def stage(name: str) -> None:
            if done:
                progress.advance(task)
            done.append(name)
            progress.update(task, description=STAGES[name])

        yield stage


def cast_inputs(value, dtype: str):
    """Floating tensors in ``value`` (tensors, tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(getattr(torch, dtype)) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(cast_inputs(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_inputs(v, dtype) for k, v in value.items()}
    return value


def _paths(paths: list[str], limit: int = 6) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", … ({len(paths) - limit} more)" if len(paths) > limit else "")


def _count(n: int) -> str:
    return count_text(n)
