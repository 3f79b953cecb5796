"""``moefx.load``: a converted model back from the directory ``moefx.save`` wrote.

``load`` rebuilds the module tree by re-running the recorded conversions on the dense
architecture (the passes look at structure, so the dense weights may be on meta), checks that
it fits the saved tensors, then puts them in place. Weights are read only through safetensors,
never pickle (``moefx.artifact.format``).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from moefx.artifact.checkpoint_source import meta_model_from_record
from moefx.artifact.format import (
    ArtifactError,
    layer_entry,
    read_manifest,
    read_tensors,
    tensor_specs,
)
from moefx.artifact.model_file import load_model_file
from moefx.artifact.tensors import (
    assign_tensors,
    meta_copy,
    to_meta_keeping_ties,
    unwrap,
)
from moefx.model import is_expert_parallel, moe_layers, named_tensors
from moefx.parallel.checkpoint import load_distributed
from moefx.passes.record import (
    Conversion,
    inputs_from_spec,
    set_conversions,
    set_model_source,
)


def load(
    out_dir: str | Path, model: nn.Module | None = None, *, example_inputs=None, example_kwargs=None, weights: bool = True
) -> nn.Module:
    """The converted model saved in ``out_dir``, with its weights.

    Given ``model`` (the dense architecture; its weights may be on meta and are replaced), it is
    converted in place the way the saved one was, and returned; a model already converted (or
    expert-parallel) keeps its parameters, filled in place. Given none, the model file
    recorded by ``moefx convert`` is imported and built: this runs that file's code, so load only
    outputs you trust. ``example_inputs``/``example_kwargs`` replace the recorded input shapes
    when the passes need real ones. ``weights=False`` stops after the conversion, the tensors left
    as they are (on meta, for a meta model): the structure for ``moefx.offload(..., storage="disk",
    path=out_dir)``, which reads the weights itself.
    """
    manifest = read_manifest(out_dir)
    source = found_source(manifest.get("source"), Path(out_dir))
    given, model = model, None if model is None else unwrap(model)
    callers = model is not None  # a model the caller passed must be left as it was if it does not fit
    if model is not None and is_expert_parallel(model):  # this rank's slices only
        _check_layer_options(model, manifest, out_dir)
        _load_into_expert_parallel(model, out_dir)
        set_model_source(model, source)
        return given
    if model is None and (manifest.get("source") or {}).get("config"):  # converted from a checkpoint directory
        model = given = meta_model_from_record(manifest["source"])  # its config is in the manifest
    elif model is None:
        source = recorded_model_file(manifest, Path(out_dir), otherwise="pass the dense model, moefx.load(dir, model=...)")
        built = load_model_file(source["file"], source.get("entry"))
        model = given = built.model
        to_meta_keeping_ties(model)  # ours to discard: every tensor comes from the file, no second copy meanwhile
        if example_inputs is None and example_kwargs is None:
            example_inputs, example_kwargs = built.example_args, built.example_kwargs
    specs = tensor_specs(Path(out_dir))
    shapes = {name: spec.shape for name, spec in specs.items()}
    recorded = tuple(Conversion.from_dict(c) for c in manifest["conversions"])
    if _tensor_shapes(model) != shapes:  # not converted yet (a model that is, is only filled in)
        trial = meta_copy(model) if callers else None  # tried on a copy first: no memory, no change
        if trial is not None:
            _reapply(trial, recorded, example_inputs, example_kwargs, out_dir)
            _check_fits(trial, shapes, out_dir)
            del trial
        _reapply(model, recorded, example_inputs, example_kwargs, out_dir)
        _check_fits(model, shapes, out_dir)
    _check_layer_options(model, manifest, out_dir)  # same shapes do not make the same routing
    set_model_source(model, source)
    if not weights:
        return given
    assign_tensors(model, read_tensors({name: spec.file for name, spec in specs.items()}))
    return given


def recorded_model_file(manifest: dict, out_dir: Path, *, otherwise: str) -> dict:
    """The output's model file (``found_source``), or an ArtifactError that says why there is none
    and ends with the ``otherwise`` fix."""
    recorded = (manifest.get("source") or {}).get("file")
    checkpoint = (manifest.get("source") or {}).get("checkpoint")
    if not recorded and checkpoint:
        raise ArtifactError(f"{out_dir} was converted from the checkpoint {checkpoint}, not a model file: {otherwise}")
    if not recorded:
        raise ArtifactError(f"{out_dir} records no model file (it was saved from Python): {otherwise}")
    source = found_source(manifest["source"], out_dir)
    if source is None:
        raise ArtifactError(f"{out_dir} was converted from {recorded}, which is not there any more: put the file back, "
                            f"or {otherwise}")
    return source


def found_source(source: dict | None, out_dir: Path) -> dict | None:
    """The recorded model file where it is now: at its path, else at the same place relative to
    the output (the two moved together); None when neither is there."""
    if source and source.get("checkpoint"):  # the directory's path is a record only: the config is in the manifest
        return {key: value for key, value in source.items() if key != "checkpoint_from_output"}
    if not source or not source.get("file"):
        return None
    candidates = [Path(source["file"])]
    if source.get("file_from_output"):
        candidates.append(out_dir.absolute() / source["file_from_output"])
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        return None
    return {key: value for key, value in source.items() if key != "file_from_output"} | {"file": str(found.resolve())}


def _load_into_expert_parallel(model: nn.Module, out_dir) -> None:
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ArtifactError(
            "the expert-parallel model has weights on the meta device: materialise it (model.to_empty(device=...)) "
            "before moefx.parallelize, then load"
        )
    load_distributed(model, out_dir, {name: t.detach() for name, t in named_tensors(model)})


def _reapply(model: nn.Module, recorded: tuple[Conversion, ...], example_inputs, example_kwargs, out_dir) -> None:
    # moefy, step by step, to check the FFNs found against the record before any change
    from moefx.passes.capture import CaptureError  # the runtime does not import the passes at module level
    from moefx.passes.driver import ConversionOptions, convert_found, search

    for conversion in recorded:
        if conversion.adopted is not None:  # existing MoE blocks: swapped again, weights from the file
            from moefx.passes.adopt import readopt

            readopt(model, conversion.adopted, out_dir)
            continue
        options = ConversionOptions.from_dict({
            **conversion.options.as_dict(), "include": [c.path for c in conversion.converted], "exclude": None,
            "every": 1, "split_by": "contiguous", "router_init": "random",
            "init": "split" if conversion.options.init == "split" else "random",  # the weights come from the file
        })
        args, kwargs = example_inputs, example_kwargs
        recorded_inputs = args is None and kwargs is None and conversion.example_inputs is not None
        if recorded_inputs:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            args, kwargs = inputs_from_spec(conversion.example_inputs, device)
        try:
            found = search(model, args, kwargs)
        except CaptureError as err:
            if not (recorded_inputs and err.__cause__ is not None):  # not the model's forward refusing the inputs
                raise
            refusal = (str(err.__cause__).strip().splitlines() or [""])[0]
            raise ArtifactError(
                f"{type(model).__name__} does not match the conversion recorded in {out_dir}: its forward fails on the "
                f"example inputs recorded there ({type(err.__cause__).__name__}: {refusal}): pass the dense model the "
                "output was converted from, or example_inputs= its forward accepts"
            ) from err
        if not found.matches and next(moe_layers(model), None) is not None:
            continue  # already converted, as moefy: _check_fits says whether it fits
        _check_matches(model, list(options.include), [m.path for m in found.matches], out_dir)
        convert_found(model, found, options, example_inputs=args, example_kwargs=kwargs)
    set_conversions(model, recorded)  # the record as saved, not the re-application's options


def _check_matches(model: nn.Module, expected: list[str], found: list[str], out_dir) -> None:
    """Every FFN the record converted must be among those found in ``model`` (before any change)."""
    if all(any(fnmatchcase(path, glob) for path in found) for glob in expected):
        return
    raise ArtifactError(
        f"{type(model).__name__} does not match the conversion recorded in {out_dir}: expected FFNs at "
        f"{_shortened(expected)}, found {f'FFN candidates at {_shortened(found)}' if found else 'no FFN candidate'}: "
        "pass the dense model the output was converted from"
    )


def _shortened(paths: list[str], limit: int = 4) -> str:
    shown = ", ".join(paths[:limit])
    return f"[{shown}{f', … ({len(paths) - limit} more)' if len(paths) > limit else ''}]"


def _check_fits(model: nn.Module, shapes: dict[str, tuple], out_dir) -> None:
    have = _tensor_shapes(model)
    missing, unexpected = sorted(shapes.keys() - have.keys()), sorted(have.keys() - shapes.keys())
    wrong = sorted(n for n in have.keys() & shapes.keys() if have[n] != shapes[n])
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"saved tensors the model lacks: {missing[:5]}")
        if unexpected:
            problems.append(f"model tensors not saved: {unexpected[:5]}")
        if wrong:
            problems.append("shapes differ: " + ", ".join(f"{n} is {have[n]} in the model, {shapes[n]} saved" for n in wrong[:3]))
        raise ArtifactError(
            f"the model does not fit the weights in {out_dir} ({'; '.join(problems)}): pass the dense model the "
            "output was converted from"
        )


def _check_layer_options(model: nn.Module, manifest: dict, out_dir) -> None:
    """A model converted before (with other options) can hold tensors of the saved shapes and still
    route differently (gate, top-k, capacity): filling it would give other outputs, silently."""
    saved = {entry["path"]: entry for entry in manifest.get("moe_layers", ())}
    differences = []
    for path, layer in moe_layers(model):
        if path not in saved:
            continue  # _check_fits names tensors that are not in the file
        mine = layer_entry(path, layer)
        differences += [f"{path}.{key}: the model's {mine[key]!r}, saved {saved[path][key]!r}"
                        for key in saved[path] if key in mine and mine[key] != saved[path][key]]
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise ArtifactError(
            f"the model's MoE layers differ from those saved in {out_dir}: {'; '.join(differences[:3])}{more}; "
            "load into the dense model (or call moefx.load(dir) with no model), or convert it with the saved options"
        )


def _tensor_shapes(model: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in named_tensors(model)}

