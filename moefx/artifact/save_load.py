"""``moefx.save`` and ``moefx.load``: a converted model as a directory of ``moefx.json`` + ``model.safetensors``.

    out/
      moefx.json          versions, the model file and entry (when known), every conversion
                          (options, converted FFNs with d_model/d_hidden/kind, rejected candidates,
                          example input shapes), parameter counts (total, active per token)
      model.safetensors   every parameter and buffer of the converted model, tied ones once

``load`` rebuilds the module tree by re-running the recorded conversions on the dense
architecture (the passes look at structure, so the dense weights may be on meta), then puts the
saved tensors in place. Weights are read only through safetensors, never pickle.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moefx.artifact.atomic import atomic_directory
from moefx.parallel.checkpoint import MANIFEST, is_expert_parallel, load_distributed, save_distributed, write_manifest
from moefx.model import moe_layers, named_tensors, parameter_counts
from moefx.artifact.model_file import load_model_file
from moefx.offloading.experts import is_offloaded
from moefx.artifact.record import Conversion, conversions, inputs_from_spec, model_source, set_conversions, set_model_source
from moefx.artifact.weight_files import INDEX, WEIGHTS, weight_files

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


class ArtifactError(RuntimeError):
    """A moefx output directory that cannot be read back, or a model that does not fit it."""


def save(model: nn.Module, out_dir: str | Path, *, force: bool = False, source: dict | None = None) -> Path:
    """Write ``model`` to ``out_dir`` atomically; returns the directory.

    ``source`` (``{"file": ..., "entry": ..., "dtype": ...}``) lets ``load(out_dir)`` rebuild the
    dense model by itself; without it, ``load`` needs the dense model passed in. An expert-parallel
    model is saved by every rank together (``moefx.parallel.checkpoint``: call it on all ranks,
    with ``out_dir`` on a shared filesystem); any other model is written by the calling process
    alone (under DDP, call it on one rank). ``force`` replaces only an earlier moefx output.
    """
    model = _unwrap(model)
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


def manifest_for(model: nn.Module, source: dict | None = None) -> dict:
    import moefx

    counts = parameter_counts(model)
    return {
        "format": "moefx", "format_version": FORMAT_VERSION,
        "moefx_version": moefx.__version__, "torch_version": torch.__version__.split("+")[0],
        "source": source,
        "conversions": [c.as_dict() for c in conversions(model)],
        "moe_layers": [_layer_entry(path, layer) for path, layer in moe_layers(model)],
        "parameters": {"total": counts.total, "active_per_token": counts.active_per_token, "per_expert": counts.expert},
    }


def _layer_entry(path: str, layer) -> dict:
    c = layer.config
    return {
        "path": path, "kind": "glu" if c.gated else "mlp", "d_model": c.d_model, "d_hidden_per_expert": c.d_hidden,
        "num_experts": c.num_experts, "top_k": c.top_k, "gate": c.gate, "capacity_factor": c.capacity_factor,
    }


def read_manifest(out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not (out_dir.exists() or out_dir.is_symlink()):
        raise ArtifactError(f"{out_dir} does not exist: pass the directory that moefx convert (-o) or moefx.save wrote")
    if not path.is_file() or not ((out_dir / WEIGHTS).is_file() or (out_dir / INDEX).is_file()):
        raise ArtifactError(
            f"{out_dir} is not a moefx output: it needs {MANIFEST} and {WEIGHTS} (or {INDEX}), made by moefx convert "
            "or moefx.save"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}): write the output again (moefx convert / moefx.save)") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} holds a JSON {type(manifest).__name__}, not moefx's record: write the output again")
    if manifest.get("format") != "moefx" or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}; this moefx "
            f"reads 'moefx' version {FORMAT_VERSION}"
        )
    return manifest


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
    given, model = model, None if model is None else _unwrap(model)
    callers = model is not None  # a model the caller passed must be left as it was if it does not fit
    if model is not None and is_expert_parallel(model):  # this rank's slices only
        _load_into_expert_parallel(model, out_dir)
        set_model_source(model, source)
        return given
    if model is None:
        source = recorded_model_file(manifest, Path(out_dir), otherwise="pass the dense model, moefx.load(dir, model=...)")
        built = load_model_file(source["file"], source.get("entry"))
        model = given = built.model
        _to_meta_keeping_ties(model)  # ours to discard: every tensor comes from the file, no second copy meanwhile
        if example_inputs is None and example_kwargs is None:
            example_inputs, example_kwargs = built.example_args, built.example_kwargs
    files = weight_files(Path(out_dir))
    shapes = {}
    for file in files:
        with _opened(file) as f:
            shapes.update((name, tuple(f.get_slice(name).get_shape())) for name in f.keys())
    recorded = tuple(Conversion.from_dict(c) for c in manifest["conversions"])
    if _tensor_shapes(model) != shapes:  # not converted yet (a model that is, is only filled in)
        trial = _meta_copy(model) if callers else None  # tried on a copy first: no memory, no change
        if trial is not None:
            _reapply(trial, recorded, example_inputs, example_kwargs, out_dir)
            _check_fits(trial, shapes, out_dir)
            del trial
        _reapply(model, recorded, example_inputs, example_kwargs, out_dir)
        _check_fits(model, shapes, out_dir)
    set_model_source(model, source)
    if not weights:
        return given
    tensors = {}
    for file in files:
        with _opened(file) as f:
            tensors.update((name, f.get_tensor(name)) for name in f.keys())
    assign_tensors(model, tensors)
    return given


@contextmanager
def _opened(file: Path):
    """A weights file, open; one that safetensors cannot read is an ArtifactError naming it."""
    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{file} cannot be read ({err}): write the output again (moefx convert / moefx.save)") from err
    with handle as f:
        yield f


def recorded_model_file(manifest: dict, out_dir: Path, *, otherwise: str) -> dict:
    """The output's model file (``found_source``), or an ArtifactError that says why there is none
    and ends with the ``otherwise`` fix."""
    recorded = (manifest.get("source") or {}).get("file")
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
    if not source or not source.get("file"):
        return None
    candidates = [Path(source["file"])]
    if source.get("file_from_output"):
        candidates.append(out_dir.absolute() / source["file_from_output"])
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        return None
    return {key: value for key, value in source.items() if key != "file_from_output"} | {"file": str(found.resolve())}


def _meta_twins(model: nn.Module) -> dict[int, Tensor]:
    """A meta tensor for each parameter and buffer, by the id of the original: one per tensor, so a
    tensor several modules hold (tied embeddings) keeps one twin. The caller keeps the originals
    alive while it uses the ids."""
    twins = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for old in table.values():
                if old is not None and id(old) not in twins:
                    meta = torch.empty_like(old, device="meta")
                    twins[id(old)] = nn.Parameter(meta, old.requires_grad) if isinstance(old, nn.Parameter) else meta
    return twins


def _meta_copy(model: nn.Module) -> nn.Module | None:
    """A deep copy of ``model`` whose parameters and buffers are on meta (tied ones still tied);
    None for a model that cannot be copied (it holds a lock, say)."""
    try:
        return copy.deepcopy(model, _meta_twins(model))
    except Exception:  # noqa: BLE001  (then the model itself is converted, as before this check)
        log.debug("cannot copy %s to check the fit first", type(model).__name__, exc_info=True)
        return None


def _to_meta_keeping_ties(model: nn.Module) -> None:
    """``model.to("meta")``, except that a tensor several modules hold (tied embeddings) stays one
    tensor: ``.to`` gives each holder a copy of its own, so the saved file, which has the tied
    tensor once, would then miss the others."""
    twins = _meta_twins(model)  # built before any swap, while every original is alive
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, old in table.items():
                if old is not None:
                    table[key] = twins[id(old)]


def _load_into_expert_parallel(model: nn.Module, out_dir) -> None:
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ArtifactError(
            "the expert-parallel model has weights on the meta device: materialise it (model.to_empty(device=...)) "
            "before moefx.parallelize, then load"
        )
    load_distributed(model, out_dir, {name: t.detach() for name, t in named_tensors(model)})


def _fill_in_place(old: Tensor, value: Tensor) -> bool:
    if old.is_meta or old.dtype != value.dtype or old.shape != value.shape:
        return False
    old.copy_(value)
    return True


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _reapply(model: nn.Module, recorded: tuple[Conversion, ...], example_inputs, example_kwargs, out_dir) -> None:
    # moefy, step by step, to check the FFNs found against the record before any change
    from moefx.passes.capture import CaptureError  # the runtime does not import the passes at module level
    from moefx.passes.driver import conversion_options, convert_found, search

    for conversion in recorded:
        options = dict(conversion.options)
        options.update(
            include=[c.path for c in conversion.converted], exclude=None, every=1, split_by="contiguous",
            init="split" if options["init"] == "split" else "random",  # the weights come from the file
        )
        args, kwargs = example_inputs, example_kwargs
        recorded_inputs = args is None and kwargs is None and conversion.example_inputs is not None
        if recorded_inputs:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            args, kwargs = inputs_from_spec(conversion.example_inputs, device)
        options = conversion_options(**options)
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
        _check_matches(model, options["include"], [m.path for m in found.matches], out_dir)
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
            problems.append(f"shapes differ for {[(n, have[n], shapes[n]) for n in wrong[:3]]}")
        raise ArtifactError(
            f"the model does not fit the weights in {out_dir} ({'; '.join(problems)}): pass the dense model the "
            "output was converted from"
        )


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


def _tensor_shapes(model: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in named_tensors(model)}


@torch.no_grad()
def assign_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Fill the model's tensors named in ``tensors``: in place where shape and dtype match (an
    optimizer or a hook that holds them keeps working), else by replacing them (meta tensors,
    another dtype), keeping tied and shared ones tied. Tensors land on the device the model's
    tensor is on (the CPU for a meta one)."""
    new = {}
    for name, p in model.named_parameters():
        if name not in tensors or _fill_in_place(p, tensors[name]):
            continue
        device = "cpu" if p.is_meta else p.device
        new[id(p)] = nn.Parameter(tensors[name].to(device), requires_grad=p.requires_grad)
    for name, b in model.named_buffers():
        if name in tensors and not _fill_in_place(b, tensors[name]):
            new[id(b)] = tensors[name].to("cpu" if b.is_meta else b.device)
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, old in table.items():
                if old is not None and id(old) in new:
                    table[key] = new[id(old)]
