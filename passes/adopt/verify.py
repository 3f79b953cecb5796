"""Checks an adoption numerically before anything changes: the original block and the moefx
layer built for it run on the same probe tokens in float64 copies; a difference refuses it."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import Tensor, nn

from moefx.layer.moe import MoE
from moefx.passes.adopt.probe import probe_tokens
from moefx.passes.adopt.spec import AdoptedBlock

TOLERANCE = 1e-5  # relative to the output's largest value; float64 agrees to ~1e-7 where a router runs in float32


def verified(block: nn.Module, spec: AdoptedBlock) -> tuple[AdoptedBlock, MoE] | str:
    """(spec, the moefx layer) when the layer computes what ``block`` does, else the difference in words.
    A block whose parameters are on the meta device has no values to compare: it is built unchecked."""
    if any(p.is_meta for p in block.parameters()):
        return spec, spec.build()
    x = probe_tokens(spec.d_model, dtype=torch.float64, shape=(2, 16))
    try:
        return _compare(block, spec, x)
    except Exception as err:  # a block that fails on tokens [B, S, D] is not one moefx can check
        return f"it cannot be run on probe tokens to check the adoption: {type(err).__name__}: {err}".splitlines()[0]


def _compare(block: nn.Module, spec: AdoptedBlock, x: Tensor) -> tuple[AdoptedBlock, MoE] | str:
    with torch.no_grad():
        want = _reference(block)(x.clone())
        pair = isinstance(want, tuple)
        if pair:  # (output, router scores): GPT-OSS's form
            if not (len(want) == 2 and isinstance(want[0], Tensor)):
                return f"it returns {type(want).__name__} of {len(want)}, not an output (and router scores)"
            spec, want = replace(spec, returns_router_scores=True), want[0]
        try:
            layer = spec.build()
        except ValueError as err:
            return str(err)
        got = copy.deepcopy(layer).double().eval()(x.clone())
        got = got[0] if pair else got
    if not isinstance(want, Tensor) or want.shape != got.shape:
        return f"its output {getattr(want, 'shape', type(want).__name__)} is not shaped like its input"
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if error > TOLERANCE:
        return f"the moefx layer built for it differs from it by {error:.1e} (relative) on probe tokens"
    return spec, layer.train(block.training)


def _reference(block: nn.Module) -> nn.Module:
    """A float64 copy of ``block`` in eval mode. transformers' grouped_mm experts take no float64:
    the copy's experts run their eager loop (a config option of the copy only)."""
    ref = copy.deepcopy(block).double().eval()
    for module in ref.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) not in (None, "eager"):
            config._experts_implementation = "eager"
    return ref
