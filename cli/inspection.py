"""``moefx inspect MODEL_PY | OUT_DIR``: a summary (source, options, FFNs, parameters before and
after), the module tree with every FFN candidate marked (identical layers shown once unless
``--full``), and the graph of one MoE layer with shapes (or all of it as JSON). Inspecting an
output directory loads it with ``moefx.load``, which imports the model file it records: that runs
the file's code."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from moefx.artifact.format import MANIFEST, ArtifactError
from moefx.artifact.load import load
from moefx.artifact.model_file import MODEL_FILE_SOURCE, ModelFileError, load_model_file, source_problem
from moefx.cli.checks import CLIError, options_from_args
from moefx.cli.layer_graph import layer_graph
from moefx.cli.views import Candidate, candidates, graph_table, inspect_summary, make_console, module_tree
from moefx.model import expert_size, moe_layers, parameter_counts
from moefx.passes.adopt import adopt_blocks, record_adoption
from moefx.passes.capture import CaptureError
from moefx.passes.driver import ConversionOptions, convert_found, search
from moefx.passes.record import Conversion, add_conversion, conversions, model_source
from moefx.passes.rewrite import RewriteError


def run_inspect(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_dir() and not (target / MANIFEST).is_file():
        raise CLIError(f"{target} is a directory but not a moefx output (no {MANIFEST} in it): pass a directory that "
                       f"moefx convert wrote, or {MODEL_FILE_SOURCE}", code=2)
    if target.is_file() and (problem := source_problem(target)):
        raise CLIError(f"{problem}, or a directory that moefx convert wrote", code=2)
    if target.is_dir():
        given = args.typed_conversion_options
        if given:
            raise CLIError(
                f"{' '.join(given)} cannot change {target}: an output directory is shown as it was converted. "
                "Pass the options with the model file instead (moefx inspect MODEL_PY ...)", code=2)
        model, source = _from_output(target), str(target.absolute())
        before, origin = None, _output_origin(model, target)
    elif target.is_file():
        options = options_from_args(args)
        model, before, entry = _from_model_file(target, args, options)
        origin = {"kind": "model file", "file": target.name, "entry": entry, "description": f"{target.name}:{entry}"}
        source = str(target.absolute())
    else:
        raise CLIError(f"{args.target} does not exist: pass {MODEL_FILE_SOURCE}, or a directory that moefx convert wrote", code=2)
    found = candidates(conversions(model))
    layers = list(moe_layers(model))
    chosen = _pick_layer(layers, args.layer)
    steps = layer_graph(chosen[1]) if chosen else []
    summary = _summary(model, found, layers, {"path": source, **origin}, before)
    if args.json:
        print(json.dumps({
            "model": type(model).__name__, "source": source, "summary": summary,
            "candidates": [asdict(c) for c in found],
            "moe_layers": [path for path, _ in layers],
            "layer": {"path": chosen[0], "graph": [asdict(s) for s in steps]} if chosen else None,
        }, indent=2))
        return 0
    console = make_console()
    console.print(inspect_summary(summary))
    console.print()
    console.print(module_tree(model, found, full=args.full))
    if chosen:
        console.print()
        console.print(graph_table(chosen[0], steps, layer=chosen[1], full=args.full))
    else:
        console.print("no MoE layer: no feed-forward block was found, see the rejected candidates above")
    return 0


def _output_origin(model, out_dir: Path) -> dict:
    recorded = model_source(model) or {}
    origin = {"kind": "output directory", "file": Path(recorded["file"]).name if recorded.get("file") else None,
              "entry": recorded.get("entry")}
    converted_from = f" (converted from {origin['file']}:{origin['entry']})" if origin["file"] else ""
    return {**origin, "description": f"{out_dir}{converted_from}"}


def _summary(model, found: list[Candidate], layers, source: dict, before: int | None) -> dict:
    """What ``inspect`` shows first, and adds to its JSON: the source, the options, how many FFNs
    were found and converted, and the parameters before and after conversion."""
    recorded = conversions(model)
    status = [c.status for c in found]
    after = parameter_counts(model) if layers else None
    if before is None:
        before = dense_parameters(model)
    return {
        "model": type(model).__name__,
        "source": source,
        "options": next((c.options.as_dict() for c in reversed(recorded) if c.converted), None),
        "router_calibration": next((c.router_calibration for c in reversed(recorded) if c.converted), None),
        "ffns": {"found": status.count("converted") + status.count("skipped"), "converted": status.count("converted"),
                 "skipped": status.count("skipped"), "rejected": status.count("rejected")},
        "moe_layers": len(layers),
        "parameters": {
            "before": before, "after": after.total if after else before,
            "active_per_token": after.active_per_token if after else before,
            "per_expert": after.expert if after else None,
        },
    }


def dense_parameters(model) -> int:
    """The parameters of the model before conversion, from the converted one: each MoE layer
    counted as the dense FFN it replaced (its record gives the FFN's sizes, kind and biases)."""
    total = parameter_counts(model).total
    adopted = {path for c in conversions(model) for path in (c.adopted or {})}  # an MoE before: counted as it is
    for _, layer in (entry for entry in moe_layers(model) if entry[0] not in adopted):
        total -= layer.config.num_experts * expert_size(layer) + sum(
            p.numel() for name, p in layer.named_parameters() if not name.startswith("experts."))
    for conversion in conversions(model):
        for ffn in conversion.converted:
            projections = 3 if ffn.kind == "glu" else 2
            biases = (2 if ffn.kind == "glu" else 1) * ffn.d_hidden + ffn.d_model if ffn.bias else 0
            total += projections * ffn.d_model * ffn.d_hidden + biases
    return total


def _from_output(out_dir: Path):
    try:
        return load(out_dir)
    except (ArtifactError, ModelFileError, CaptureError) as err:
        raise CLIError(f"cannot load {out_dir}: {err}") from err


def _from_model_file(file: Path, args: argparse.Namespace, options: ConversionOptions):
    """The model converted in memory with the command's options (nothing is written), its
    parameter count before conversion, and the builder's name."""
    try:
        built = load_model_file(file, args.entry)
        model = built.model
        before = parameter_counts(model).total
        adoption = adopt_blocks(model, num_experts=None, top_k=None)  # existing MoE blocks first, as convert does
        record_adoption(model, adoption, options, None)
        found = search(model, built.example_args, built.example_kwargs)
        if not found.matches:  # nothing converts; still show what was rejected
            add_conversion(model, Conversion(options, (), rejected=tuple((r.path, r.reason) for r in found.rejected)))
            return model, before, built.entry
        convert_found(model, found, options, example_inputs=built.example_args, example_kwargs=built.example_kwargs)
    except (ModelFileError, CaptureError, RewriteError, ValueError) as err:
        raise CLIError(str(err)) from err
    return model, before, built.entry


def _pick_layer(layers, path: str | None):
    if path is None:
        return layers[0] if layers else None
    for entry in layers:
        if entry[0] == path:
            return entry
    raise CLIError(f"--layer {path} is not an MoE layer; the MoE layers are {[p for p, _ in layers][:8]}", code=2)
