"""Converting a checkpoint without holding it: the conversion runs on the meta device, then every
tensor of the converted model is made when the writer (``moefx.artifact.shards``) reaches it.

    dense (meta) ──deepcopy, moefy──▶ converted (meta): the structure, the record, the manifest
    plan: one PlannedTensor per name of the converted model
      a dense tensor     read from the checkpoint's file (under any name it is tied to), cast
      an MoE tensor      its layer built from that FFN's tensors alone, with the init moefy uses
                         (``moefx.passes.rewrite.layer_for``: same seed per layer, same tensors),
                         kept until the writer moves past the layer, then dropped
      a buffer           computed on the meta model (rotary frequencies), small

Peak memory is a constant plus one MoE layer and the FFN it comes from, whatever the model's size.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from moefx.artifact.checkpoint_source import CheckpointError
from moefx.artifact.format import DTYPES, TensorSpec, read_tensors
from moefx.artifact.shards import PlannedTensor
from moefx.model import moe_layers, named_tensors
from moefx.passes.driver import convert_found, search
from moefx.passes.find_ffn import FFNMatch, FFNSearch
from moefx.passes.options import ConversionOptions
from moefx.passes.record import Conversion
from moefx.passes.rewrite import layer_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetaConversion:
    converted: nn.Module  # the converted model on meta (non-persistent buffers real)
    dense: nn.Module  # the dense model on meta, untouched: where each FFN's template is made
    matches: dict[str, FFNMatch]  # the converted FFNs by MoE layer path
    conversion: Conversion
    found: FFNSearch  # every FFN found and every candidate rejected (the dry run's report)


def convert_on_meta(dense: nn.Module, options: ConversionOptions, example_inputs, example_kwargs=None) -> MetaConversion:
    """moefy's conversion of a copy of the meta ``dense`` model: what is converted, and how."""
    if options.router_init == "kmeans":
        raise CheckpointError(
            "router_init='kmeans' clusters hidden states of a forward over the real weights, which a streamed "
            "conversion never holds: use router_init 'weights' or 'random', or convert from a Python model file"
        )
    converted = copy.deepcopy(dense)
    found = search(converted, example_inputs, example_kwargs)
    conversion = convert_found(converted, found, options, example_inputs=example_inputs, example_kwargs=example_kwargs)
    done = {c.path for c in conversion.converted}
    return MetaConversion(converted, dense, {m.path: m for m in found.matches if m.path in done}, conversion, found)


def stream_plan(meta: MetaConversion, files: dict[str, TensorSpec], names: Sequence[str] | None = None) -> list[PlannedTensor]:
    """The converted model's tensors (``names``; default: every parameter and buffer, tied ones once)
    as a plan whose entries read or build each tensor when made. Every dense tensor is checked
    against the files' headers first, so a checkpoint that does not fit fails before any write."""
    model = meta.converted
    if names is None:
        names = [name for name, _ in named_tensors(model)]
    tensors = _all_named(model)
    aliases = _aliases(model)
    layers = LayerBuilder(meta, files)
    groups: dict[str, list[str]] = {}  # an MoE layer's tensors together (its buffers come after all parameters),
    for name in names:                 # so each layer is built once
        groups.setdefault(layers.owner(name) or name, []).append(name)
    plan = []
    for name in (name for group in groups.values() for name in group):
        tensor = tensors[name]
        shape, dtype = tuple(tensor.shape), tensor.dtype
        layer = layers.owner(name)
        if layer is not None:
            plan.append(PlannedTensor(name, shape, dtype, _layer_tensor(layers, layer, name[len(layer) + 1:])))
            continue
        stored = next((alias for alias in aliases[id(tensor)] if alias in files), None)
        if stored is not None:
            _check_stored(name, stored, files[stored], shape)
            plan.append(PlannedTensor(name, shape, dtype, _file_tensor(stored, files[stored].file, dtype)))
        elif not tensor.is_meta:
            plan.append(PlannedTensor(name, shape, dtype, lambda t=tensor: t))
        else:
            tied = aliases[id(tensor)][1:]
            raise CheckpointError(
                f"the checkpoint has no tensor {name}{f' (nor {tied}, tied to it)' if tied else ''}, which the model its "
                "config.json describes needs: pass the directory save_pretrained wrote for this model"
            )
    return plan


class LayerBuilder:
    """Builds one MoE layer at a time from its FFN's tensors, keeping the last one built."""

    def __init__(self, meta: MetaConversion, files: dict[str, TensorSpec]) -> None:
        self.meta, self.files = meta, files
        self.paths = sorted((path for path, _ in moe_layers(meta.converted)), key=len, reverse=True)
        self.build = {k: v for k, v in meta.conversion.options.as_dict().items() if k not in ("include", "exclude", "every")}
        self.dense_aliases = _aliases(meta.dense)
        self.current: tuple[str, dict[str, Tensor]] | None = None
        self.built = 0  # layers built so far (a layer built twice means the plan's order was not by layer)

    def owner(self, name: str) -> str | None:
        return next((path for path in self.paths if name.startswith(path + ".")), None)

    def tensors(self, path: str) -> dict[str, Tensor]:
        if self.current is None or self.current[0] != path:
            self.current = None  # the previous layer is dropped before the next is built
            self.current = (path, self._build(path))
            self.built += 1
        return self.current[1]

    def _build(self, path: str) -> dict[str, Tensor]:
        match = self.meta.matches.get(path)
        if match is None:
            raise CheckpointError(f"the MoE layer {path} has no converted FFN on record: convert the model again")
        dense = self.meta.dense
        names = [n for n in (match.up, match.gate, match.down, match.up_bias, match.gate_bias, match.down_bias) if n]
        held = {}
        for name in names:
            module_path, _, attr = name.rpartition(".")
            module = dense.get_submodule(module_path)
            held[name] = (module, attr, module._parameters[attr])
        try:
            for name, (module, attr, old) in held.items():
                stored = next((a for a in self.dense_aliases[id(old)] if a in self.files), None)
                if stored is None:
                    raise CheckpointError(f"the checkpoint has no tensor {name}, a weight of the FFN at {path}: pass the "
                                          "directory save_pretrained wrote for this model")
                _check_stored(name, stored, self.files[stored], tuple(old.shape))
                value = _file_tensor(stored, self.files[stored].file, old.dtype)()
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
            layer = layer_for(dense, match, **self.build)
        finally:
            for module, attr, old in held.values():  # the dense model goes back to meta
                module._parameters[attr] = old
        return {name: t.detach() for name, t in _all_named(layer).items()}


def _layer_tensor(layers: LayerBuilder, path: str, local: str):
    return lambda: layers.tensors(path)[local]


def _file_tensor(name: str, file: Path, dtype):
    def make() -> Tensor:
        return read_tensors({name: file})[name].to(dtype)
    return make


def _check_stored(name: str, stored: str, spec: TensorSpec, shape: tuple) -> None:
    if tuple(spec.shape) != shape or spec.dtype not in DTYPES:
        raise CheckpointError(
            f"the checkpoint's {stored} is {spec.dtype} {list(spec.shape)} in {spec.file.name}, but the model its "
            f"config.json describes has {name} of shape {list(shape)}: the config and the weights do not belong together"
        )


def _all_named(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each tensor (tied embeddings have two), by the tensor's id, in model order."""
    names: dict[int, list[str]] = {}
    for name, tensor in _all_named(model).items():
        names.setdefault(id(tensor), []).append(name)
    return names
