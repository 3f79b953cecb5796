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
from moefx.passes.adopt import Adoption, AdoptionError, adopt_blocks, record_adoption, undo
from moefx.passes.capture import CaptureError
from moefx.passes.driver import ConversionOptions, NoFFNFound, convert_found, search
from moefx.passes.record import Conversion, UnrecordableInput, input_spec
from moefx.passes.rewrite import RewriteError

DEFAULT_EXPERTS = 8  # --experts' default (cli.main): an adopted block keeps its own count unless one is given
STAGES = {"load": "loading the model file", "capture": "capturing the graph", "match": "matching FFNs",
          "rewrite": "rewriting FFNs as MoE", "write": "writing"}


def run_convert(args: argparse.Namespace) -> int:
    args.explicit_top_k = args.top_k  # before options_from_args fills the default: only a given one binds adopted blocks
    options = options_from_args(args)
    check_calibration_flag(args, options.router_init)
    if is_checkpoint_source(args.model_py):  # streamed; it refuses router_init kmeans (a forward over real weights)
        from moefx.cli.convert_checkpoint import run_convert_checkpoint

        return run_convert_checkpoint(args, options)
    _check_shard_size(args)
    file = check_model_file(args.model_py)
    out = Path(args.out or f"{file.stem}-moefx")
    refuse_output(out, args)
    with _progress(enabled=not args.json) as stage:
        stage("load")
        built = _load(file, args.entry)
        model, inputs, kwargs = built.model, built.example_args, built.example_kwargs
        if args.dtype:
            model.to(getattr(torch, args.dtype))
            inputs, kwargs = cast_inputs(inputs, args.dtype), cast_inputs(kwargs, args.dtype)
        source = {"file": str(built.path), "entry": built.entry, "dtype": args.dtype}
        return convert_in_memory(args, options, model, inputs, kwargs, stage, out=out, source=source,
                                 label=f"{file.name}:{built.entry}", search_in=lambda: _search(model, built, stage))


def convert_in_memory(args, options: ConversionOptions, model, inputs, kwargs, stage, *, out: Path, source: dict,
                      label: str, search_in=None) -> int:
    """Adopt ``model``'s existing MoE blocks (as moefy does), convert its dense FFNs, write it to ``out``
    (``source``: what the manifest records) and print the summary. ``search_in``: the search, with its
    own error words (default: ``search``)."""
    before = parameter_counts(model)
    adoption = _adopt(model, args)
    try:
        found = search_in() if search_in else search(model, inputs, kwargs, on_stage=stage)
    except BaseException:
        undo(model, adoption)  # the model as it was
        raise
    if not found.matches and not adoption.blocks:
        hint = f" (rejected candidates: {len(found.rejected)}; moefx inspect {args.model_py} shows why)" if found.rejected else ""
        refused = "".join(f"; MoE block {path} not adopted: {why}" for path, why in adoption.refused)
        raise CLIError(f"no feed-forward block found in {label} ({type(model).__name__}){refused}; nothing written{hint}")
    calibration = None
    if args.calibration and found.matches:
        tokenizer_dir = Path(args.model_py) if Path(args.model_py).is_dir() else None  # a checkpoint has its tokenizer
        calibration = read_calibration(args.calibration, model, inputs or (), kwargs or {}, tokenizer_dir)
    if args.dry_run:
        planned = _dry_run(model, found, options, inputs, kwargs, stage)
        return _report_dry_run(args, Path(args.model_py), model, found, planned, before, adoption)
    record_adoption(model, adoption, options, _example_spec(inputs, kwargs))
    conversion = None
    if found.matches:
        try:
            conversion = convert_found(model, found, options, example_inputs=inputs, example_kwargs=kwargs,
                                       on_stage=stage, calibration=calibration)
        except (NoFFNFound, RewriteError, ValueError) as err:
            raise CLIError(f"{err}; nothing written") from err
    stage("write")
    _write(model, out, args, source)
    if args.json:
        manifest = read_manifest(out) if args.format == "moefx" else {"format": "hf"}  # what was written
        print(json.dumps({"output": str(out.absolute()), **manifest}, indent=2))
        return 0
    after = parameter_counts(model)
    converted = [c.path for c in conversion.converted] if conversion else []
    skipped = [p for p, _ in conversion.skipped] if conversion else []
    rows = [
        ("model", f"{type(model).__name__} from {label}"),
        ("FFNs found", str(len(found.matches))),
        *_adoption_rows(adoption),
        ("converted", _paths(converted) or "none"),
        ("not converted", _paths(skipped) if skipped else "none"),
        ("candidates rejected", str(len(found.rejected))),
    ]
    if conversion:
        rows.append(("MoE", f"{args.experts} experts, top-{args.top_k}, gate {args.gate}, init {args.init}, "
                            f"router init {options.router_init}"
                            + (f" ({conversion.router_calibration})" if conversion.router_calibration else "")))
    rows += [
        ("parameters", f"{_count(before.total)} → {_count(after.total)}"),
        ("active per token", _count(after.active_per_token)),
        ("expert size", _expert_sizes(model)),
        ("output", str(out.absolute())),
    ]
    make_console().print(summary_table("moefx convert", rows))
    return 0


def _adopt(model, args) -> Adoption:
    """moefy's first step: existing MoE blocks become moefx layers. ``--experts``/``--top-k`` apply to dense
    FFNs; given (not the defaults) and contradicting a block, they are an error naming it."""
    try:
        return adopt_blocks(model, num_experts=None if args.experts == DEFAULT_EXPERTS else args.experts,
                            top_k=args.explicit_top_k)
    except AdoptionError as err:
        raise CLIError(str(err).replace("num_experts=", "--experts ").replace("top_k=", "--top-k ")
                       + "; nothing written", code=2) from err


def _adoption_rows(adoption: Adoption) -> list[tuple[str, str]]:
    rows = []
    if adoption.blocks:
        spec = adoption.blocks[0][0]
        rows.append(("adopted MoE blocks", _paths([s.path for s, _ in adoption.blocks])
                     + f" ({spec.family}: {spec.num_experts} experts, top-{spec.routing.top_k})"))
    if adoption.refused:
        rows.append(("MoE blocks not adopted", "; ".join(f"{p}: {why}" for p, why in adoption.refused)))
    return rows


def _example_spec(inputs, kwargs) -> dict | None:
    if inputs is None and kwargs is None:
        return None
    try:
        return input_spec((tuple(inputs) if isinstance(inputs, tuple) else tuple([inputs] if inputs is not None else ()),
                           dict(kwargs or {})))
    except UnrecordableInput:
        return None  # moefx.load will need the inputs passed again, as after moefy


def _write(model, out: Path, args, source: dict) -> None:
    """The converted model in ``--format``: moefx's own directory, or a native transformers MoE checkpoint."""
    from moefx.converting import native_writer

    if args.format == "hf":
        try:
            native_writer()(model, out, max_shard_size=shard_bytes(args), force=args.force)
        except ValueError as err:
            raise CLIError(f"{err}; nothing written") from err
        return
    save(model, out, force=args.force, source=source)


def refuse_output(out: Path, args) -> None:
    """Exit 2 before any work when ``out`` is in the way (unless --force may replace it, or a dry run)."""
    if not args.dry_run:
        try:
            refuse_existing(out.absolute(), args.force, marker=MARKERS[args.format])
        except FileExistsError as err:
            raise CLIError(str(err), code=2) from None


def shard_bytes(args) -> int | None:
    """--max-shard-size in bytes (None: no limit); a bad size exits 2."""
    from moefx.artifact.shards import parse_size

    try:
        return parse_size(args.max_shard_size)
    except ValueError as err:
        raise CLIError(str(err).replace("max_shard_size=", "--max-shard-size "), code=2) from None


def _check_shard_size(args) -> None:
    shard_bytes(args)
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
    if not found.matches:  # only adopted blocks: nothing to rewrite
        return Conversion(options=options, converted=()), parameter_counts(copy), copy
    try:
        conversion = convert_found(copy, found, options, example_inputs=inputs, example_kwargs=kwargs, on_stage=stage)
    except (NoFFNFound, RewriteError, ValueError) as err:
        raise CLIError(f"{err}; nothing written") from err
    return conversion, parameter_counts(copy), copy


def _report_dry_run(args, file: Path, model, found, planned, before, adoption: Adoption | None = None) -> int:
    conversion, after, converted = planned
    adoption = adoption or Adoption()
    if args.json:
        data = {
            "dry_run": True, "model": type(model).__name__, "source": str(file.absolute()),
            "adopt": [spec.path for spec, _ in adoption.blocks],
            "not_adopted": [{"path": path, "reason": why} for path, why in adoption.refused],
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
        *_adoption_rows(adoption),
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
