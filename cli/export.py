"""``moefx export OUT_DIR --format {pt2,aoti,tensorrt,hf}``: a moefx convert output, exported for
deployment (``moefx.exporting``). The model file the output records is imported to rebuild the
model and to give the example inputs (token inputs' batch and sequence sizes are dynamic; other
shapes are the example's); an output converted from a transformers checkpoint is rebuilt from the
config its manifest records, with token ids as example inputs. It ends with the exact Python line that loads the result.

``--format hf`` writes the converted transformers model as its native MoE family instead
(``moefx.artifact.hf_native``: Llama -> Mixtral, ...), a directory that
``AutoModelForCausalLM.from_pretrained`` loads without moefx; the tokenizer and generation config
come from the checkpoint the output was converted from, when it is still there."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves, tree_map

from moefx.artifact.atomic import refuse_existing
from moefx.artifact.checkpoint_source import config_from_record, token_inputs
from moefx.artifact.format import ArtifactError, read_manifest
from moefx.artifact.hf_native import NativeFormatError, write_native
from moefx.artifact.hf_native.write import CONFIG, DEFAULT_SHARD_SIZE
from moefx.artifact.load import load, recorded_model_file
from moefx.artifact.model_file import ModelFileError, load_model_file
from moefx.artifact.shards import parse_size
from moefx.cli.checks import CLIError
from moefx.cli.convert import cast_inputs
from moefx.cli.views import make_console, summary_table
from moefx.exporting import ExportError, StaticShapeWarning, export, is_token_input
from moefx.passes.capture import CaptureError
from moefx.passes.record import Conversion, inputs_from_spec

DEFAULT_NAMES = {"pt2": "model.pt2", "aoti": "model.aoti.pt2", "tensorrt": "model.trt.pt2"}


def run_export(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu", code=2)
    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        raise CLIError(f"{args.out_dir} is not a directory: pass the output of moefx convert", code=2)
    try:
        manifest = read_manifest(out_dir)
    except ArtifactError as err:
        raise CLIError(str(err), code=2) from err
    if args.format == "hf":
        return _export_native(args, out_dir, manifest)
    if args.max_shard_size is not None:
        raise CLIError(f"--max-shard-size is for --format hf; --format {args.format} writes one file", code=2)
    target = Path(args.output) if args.output else out_dir / DEFAULT_NAMES[args.format]
    if target.exists() and not args.force:
        raise CLIError(f"{target} exists: pass --force to replace it, or -o another file", code=2)
    if not target.parent.is_dir():
        not_dir = next((p for p in (target.parent, *target.parent.parents) if p.exists() and not p.is_dir()), None)
        if not_dir is not None:
            raise CLIError(f"-o {target}: {not_dir} is a file, not a directory; pass -o a path inside a directory",
                           code=2)
        raise CLIError(f"-o {target}: the directory {target.parent} does not exist; create it first", code=2)
    if args.format == "aoti" and target.suffix != ".pt2":
        raise CLIError(f"-o {target}: an AOTInductor package must be named *.pt2", code=2)
    started = time.perf_counter()
    model, inputs, kwargs = _rebuild(out_dir, manifest)
    model.to(device)
    inputs, kwargs = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, (inputs, kwargs))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StaticShapeWarning)
            export(model, target, example_inputs=inputs, example_kwargs=kwargs, format=args.format)
    except ExportError as err:
        raise CLIError(str(err)) from err
    static = [str(w.message) for w in caught if issubclass(w.category, StaticShapeWarning)]
    for w in caught:  # others (torch's own) shown as they would have been
        if not issubclass(w.category, StaticShapeWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for message in static:
        print(f"moefx: warning: {message}", file=sys.stderr)
    seconds = time.perf_counter() - started
    load_line = load_instruction(target, args.format)
    if args.json:
        print(json.dumps({"output": str(target.absolute()), "format": args.format, "bytes": target.stat().st_size,
                          "seconds": round(seconds, 2), "load": load_line, "warnings": static}, indent=2))
        return 0
    shapes = ", ".join(str(tuple(t.shape)) for t in tree_leaves((inputs, kwargs)) if isinstance(t, torch.Tensor))
    dynamic = args.format != "tensorrt" and any(is_token_input(t) for t in tree_leaves((inputs, kwargs)))
    rows = [
        ("from", str(out_dir.absolute())),
        ("format", args.format),
        ("inputs", (shapes or "none") + ("; static shapes" if not dynamic else "; batch and sequence dynamic"
                                         if not static else "; sizes fixed where the warning says")),
        ("output", f"{target.absolute()} ({target.stat().st_size / 2**20:.1f} MiB, {seconds:.1f} s)"),
    ]
    make_console().print(summary_table("moefx export", rows))
    print(f"load with: {load_line}")  # plain, never wrapped: it is meant to be copied
    return 0


def _export_native(args: argparse.Namespace, out_dir: Path, manifest: dict) -> int:
    target = Path(args.output) if args.output else out_dir / "hf"
    started = time.perf_counter()
    try:
        parse_size(args.max_shard_size or DEFAULT_SHARD_SIZE)  # a bad size is refused before the model is built
        refuse_existing(target.absolute(), args.force, marker=CONFIG)
    except (ValueError, FileExistsError) as err:
        raise CLIError(str(err), code=2) from err
    try:
        model = load(out_dir)
    except (ArtifactError, ModelFileError, CaptureError) as err:
        raise CLIError(f"cannot load {out_dir}: {err}") from err
    try:
        write_native(model, target, max_shard_size=args.max_shard_size, source_dir=_checkpoint_dir(manifest, out_dir),
                     force=args.force)
    except NativeFormatError as err:
        raise CLIError(f"{err}; or export another format (--format pt2)") from err
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    load_line = f"import transformers; model = transformers.AutoModelForCausalLM.from_pretrained({str(target.absolute())!r})"
    if args.json:
        print(json.dumps({"output": str(target.absolute()), "format": "hf", "bytes": size, "seconds": round(seconds, 2),
                          "architecture": json.loads((target / CONFIG).read_text())["architectures"][0], "load": load_line},
                         indent=2))
        return 0
    rows = [("from", str(out_dir.absolute())), ("format", "hf (native transformers MoE)"),
            ("output", f"{target.absolute()} ({size / 2**20:.1f} MiB, {seconds:.1f} s)")]
    make_console().print(summary_table("moefx export", rows))
    print(f"load with: {load_line}")
    return 0


def _checkpoint_dir(manifest: dict, out_dir: Path) -> Path | None:
    """The transformers checkpoint the output was converted from (for its tokenizer), if still there."""
    source = manifest.get("source") or {}
    candidates = [source.get("checkpoint"), source.get("checkpoint_from_output") and out_dir / source["checkpoint_from_output"]]
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), None)


def load_instruction(target: Path, format: str) -> str:
    """The Python line that loads ``target`` in a fresh process as ``model`` (``import moefx``
    registers the moefx ops the program calls; outputs are plain tensors and dicts, needing nothing else)."""
    path = repr(str(target.absolute()))
    if format == "aoti":
        return f"import torch, moefx; model = torch._inductor.aoti_load_package({path})"
    if format == "tensorrt":  # torch_tensorrt registers the op that runs its engines
        return f"import torch, torch_tensorrt, moefx; model = torch.export.load({path}).module()"
    return f"import torch, moefx; model = torch.export.load({path}).module()"


def _rebuild(out_dir: Path, manifest: dict):
    """The converted model with its weights, and example inputs: the model file's, else zeros of the
    shapes recorded at conversion; for an output converted from a checkpoint, token ids made from
    the config its manifest records."""
    if (manifest.get("source") or {}).get("checkpoint") and not manifest["source"].get("file"):
        return _rebuild_checkpoint(out_dir, manifest)
    try:
        source = recorded_model_file(manifest, out_dir, otherwise="use moefx.export(model, path, example_inputs=...)")
    except ArtifactError as err:
        raise CLIError(str(err)) from err
    try:
        built = load_model_file(source["file"], source.get("entry"))
        model = load(out_dir, built.model, example_inputs=built.example_args, example_kwargs=built.example_kwargs)
    except (ArtifactError, ModelFileError, CaptureError) as err:
        raise CLIError(f"cannot load {out_dir}: {err}") from err
    inputs, kwargs = built.example_args, built.example_kwargs
    if inputs is None and kwargs is None:
        specs = [Conversion.from_dict(c).example_inputs for c in manifest["conversions"]]
        if not specs or specs[0] is None:
            raise CLIError(f"{source['file']} defines no example_inputs(): export needs the forward's arguments; define it")
        inputs, kwargs = inputs_from_spec(specs[0])
    if source.get("dtype"):
        inputs, kwargs = cast_inputs(inputs, source["dtype"]), cast_inputs(kwargs, source["dtype"])
    return model, tuple(inputs or ()), kwargs or {}


def _rebuild_checkpoint(out_dir: Path, manifest: dict):
    """An output converted from a transformers checkpoint: the manifest records the config, so the
    model is rebuilt from it and the weights alone; the inputs are token ids, as ``convert`` makes them."""
    try:
        model = load(out_dir)
        # batch and sequence of 2 or more, so that torch.export keeps both dynamic (it fixes a size of 1)
        inputs = token_inputs(config_from_record(manifest["source"]), batch=2, seq_len=16, device="cpu")
    except (ArtifactError, ModelFileError, CaptureError) as err:
        raise CLIError(f"cannot load {out_dir}: {err}") from err
    return model, inputs, {}
