"""Checks an adoption numerically before anything changes: the original block and the moefx
layer built for it run on the same probe tokens; a difference refuses it.

Memory is bounded: a block whose float64 copies (block and layer) fit in ``FLOAT64_BYTES`` is checked
in float64 copies; a larger one (a full-size Mixtral block is 1.4e9 parameters: 22 GB in float64
twice) runs itself, in eval mode and its own dtype, next to the layer that adoption builds anyway,
so the check holds no weights beyond them (activations of the probe tokens only), with a
tolerance for the dtype and a few tokens allowed to route apart on near-ties."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import Tensor, nn

from moefx.layer.moe import MoE
from moefx.passes.adopt.probe import probe_tokens
from moefx.passes.adopt.spec import AdoptedBlock

TOLERANCE = 1e-5  # relative to the output's largest value; float64 agrees to ~1e-7 where a router runs in float32
FLOAT64_BYTES = 1 << 30  # the most the float64 copies of a block and its layer may take together
# In a block's own dtype: per-token tolerance, relative to the output's largest value (a wrong
# adoption, e.g. the other softmax order or the gate and up rows swapped, differs by O(1)) ...
DTYPE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
NEAR_TIES = 1 / 16  # ... and the share of tokens that may exceed it: low precision can flip a near-tie top-k


def verified(block: nn.Module, spec: AdoptedBlock) -> tuple[AdoptedBlock, MoE] | str:
    """(spec, the moefx layer) when the layer computes what ``block`` does, else the difference in words.
    A block whose parameters are on the meta device has no values to compare: it is built unchecked."""
    if any(p.is_meta for p in block.parameters()):
        return spec, spec.build()
    params = sum(p.numel() for p in block.parameters())
    try:
        if 2 * 8 * params <= FLOAT64_BYTES:
            return _compare(block, spec, probe_tokens(spec.d_model, dtype=torch.float64, shape=(2, 16)))
        dtype = next(block.parameters()).dtype
        return _compare_in_place(block, spec, probe_tokens(spec.d_model, dtype=dtype, shape=(2, 16),
                                                           device=next(block.parameters()).device))
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


def _compare_in_place(block: nn.Module, spec: AdoptedBlock, x: Tensor) -> tuple[AdoptedBlock, MoE] | str:
    """The check without copies: the block itself (eval mode for the probe, then as it was) and the
    layer, both in the block's dtype."""
    modes = [(m, m.training) for m in block.modules()]
    try:
        with torch.no_grad():
            want = block.eval()(x.clone())
    finally:
        for module, training in modes:
            module.train(training)
    pair = isinstance(want, tuple)
    if pair:
        if not (len(want) == 2 and isinstance(want[0], Tensor)):
            return f"it returns {type(want).__name__} of {len(want)}, not an output (and router scores)"
        spec, want = replace(spec, returns_router_scores=True), want[0]
    try:
        layer = spec.build().eval()
    except ValueError as err:
        return str(err)
    with torch.no_grad():
        got = layer(x.clone())
    got = got[0] if pair else got
    if not isinstance(want, Tensor) or want.shape != got.shape:
        return f"its output {getattr(want, 'shape', type(want).__name__)} is not shaped like its input"
    scale = want.abs().max().double().clamp_min(1e-30)
    error_T = ((got.double() - want.double()).abs().flatten(0, -2).amax(-1) / scale)
    tolerance = DTYPE_TOLERANCE.get(x.dtype, TOLERANCE)
    apart = int((error_T > tolerance).sum())
    if apart > NEAR_TIES * error_T.numel():
        return (f"the moefx layer built for it differs from it by {float(error_T.max()):.1e} (relative) on {apart} of "
                f"{error_T.numel()} probe tokens ({str(x.dtype).removeprefix('torch.')})")
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
