"""``moefx inspect MODEL_PY | OUT_DIR``: the module tree with every FFN candidate marked, and the
graph of one MoE layer with shapes (or all of it as JSON). Inspecting an output directory loads
it with ``moefx.load``, which imports the model file it records: that runs the file's code."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from moefx.artifact import ArtifactError, load
from moefx.cli.checks import CLIError, check_conversion_options, options_from_args
from moefx.cli.layer_graph import layer_graph
from moefx.cli.views import candidates, graph_table, make_console, module_tree
from moefx.model import moe_layers
from moefx.model_file import ModelFileError, load_model_file
from moefx.passes.capture import CaptureError
from moefx.passes.driver import convert_found, search
from moefx.passes.rewrite import RewriteError
from moefx.record import Conversion, add_conversion, conversions


def run_inspect(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_dir():
        given = args.typed_conversion_options
        if given:
            raise CLIError(
                f"{' '.join(given)} cannot change {target}: an output directory is shown as it was converted. "
                "Pass the options with the model file instead (moefx inspect MODEL_PY ...)", code=2)
        model, source = _from_output(target), str(target.absolute())
    elif target.is_file():
        check_conversion_options(args)
        options = options_from_args(args)
        model, source = _from_model_file(target, args, options), str(target.absolute())
    else:
        raise CLIError(f"{args.target} is neither a model file nor a moefx output directory", code=2)
    found = candidates(conversions(model))
    layers = list(moe_layers(model))
    chosen = _pick_layer(layers, args.layer)
    steps = layer_graph(chosen[1]) if chosen else []
    if args.json:
        print(json.dumps({
            "model": type(model).__name__, "source": source,
            "candidates": [asdict(c) for c in found],
            "moe_layers": [path for path, _ in layers],
            "layer": {"path": chosen[0], "graph": [asdict(s) for s in steps]} if chosen else None,
        }, indent=2))
        return 0
    console = make_console()
    console.print(module_tree(model, found))
    if chosen:
        console.print()
        console.print(graph_table(chosen[0], steps))
    else:
        console.print("no MoE layer: no feed-forward block was found, see the rejected candidates above")
    return 0


def _from_output(out_dir: Path):
    try:
        return load(out_dir)
    except (ArtifactError, ModelFileError, CaptureError) as err:
        raise CLIError(f"cannot load {out_dir}: {err}") from err


def _from_model_file(file: Path, args: argparse.Namespace, options: dict):
    """The model converted in memory with the command's options (nothing is written)."""
    try:
        built = load_model_file(file, args.entry)
        model = built.model
        found = search(model, built.example_args, built.example_kwargs)
        if not found.matches:  # nothing converts; still show what was rejected
            add_conversion(model, Conversion({}, (), rejected=tuple((r.path, r.reason) for r in found.rejected)))
            return model
        convert_found(model, found, options, example_inputs=built.example_args, example_kwargs=built.example_kwargs)
    except (ModelFileError, CaptureError, RewriteError, ValueError) as err:
        raise CLIError(str(err)) from err
    return model


def _pick_layer(layers, path: str | None):
    if path is None:
        return layers[0] if layers else None
    for entry in layers:
        if entry[0] == path:
            return entry
    raise CLIError(f"--layer {path} is not an MoE layer; the MoE layers are {[p for p, _ in layers][:8]}", code=2)
