"""The pass pipeline: capture → canonicalize → find_ffn → plan → rewrite, and the public entry points."""

from __future__ import annotations

import logging

from torch import nn

from moefx.config import MoEConfig
from moefx.init import INIT_STRATEGIES, SPLIT_METHODS
from moefx.model import moe_layers
from moefx.passes.canonicalize import canonicalize
from moefx.passes.capture import capture
from moefx.passes.find_ffn import FFNMatch, FFNSearch, find_ffn
from moefx.passes.plan import plan
from moefx.passes.rewrite import rewrite

log = logging.getLogger(__name__)


class NoFFNFound(ValueError):
    """The model has no feed-forward block moefx can convert."""


def search(model: nn.Module, example_inputs=None, example_kwargs=None) -> FFNSearch:
    """Every FFN of ``model`` and every rejected candidate with its reason (the model is not changed)."""
    captured = capture(model, example_inputs, example_kwargs)
    gm = captured.graph_module
    canonicalize(gm)
    result = find_ffn(gm)
    log.info("%s: %d FFNs found, %d candidates rejected", type(model).__name__, len(result.matches), len(result.rejected))
    return result


def find_ffns(model: nn.Module, example_inputs=None, example_kwargs=None) -> list[FFNMatch]:
    """The feed-forward blocks of ``model`` as ``FFNMatch`` objects, in graph order."""
    return list(search(model, example_inputs, example_kwargs).matches)


def moefy(
    model: nn.Module, num_experts: int = 8, top_k: int = 2, *, example_inputs=None, example_kwargs=None,
    init: str = "upcycle", gate: str = "topk", capacity_factor=None, include=None, exclude=None, every: int = 1,
    drop_fraction: float = 0.5, split_by: str = "contiguous", **moe_options,
) -> nn.Module:
    """Convert ``model``'s feed-forward blocks to MoE layers in place; returns the model.

    A model that is already converted is returned unchanged. Raises ``NoFFNFound`` (with every
    rejected candidate's reason) when there is nothing to convert, and ``ValueError`` when
    ``include``/``exclude``/``every`` leave nothing.
    """
    if init not in INIT_STRATEGIES:
        raise ValueError(f"init={init!r} is unknown: must be one of {list(INIT_STRATEGIES)}")
    if split_by not in SPLIT_METHODS:
        raise ValueError(f"split_by={split_by!r} is unknown: must be one of {list(SPLIT_METHODS)}")
    options = dict(gate=gate, capacity_factor=capacity_factor, **moe_options)
    MoEConfig(d_model=1, d_hidden=1, num_experts=num_experts, top_k=top_k, **options)  # fail before capturing
    found = search(model, example_inputs, example_kwargs)
    if not found.matches:
        if any(True for _ in moe_layers(model)):
            log.info("%s is already converted: nothing new to convert", type(model).__name__)
            return model
        raise NoFFNFound(_nothing_found(model, found))
    chosen = plan(found.matches, include=include, exclude=exclude, every=every)
    if not chosen.convert:
        paths = [m.path for m in found.matches]
        raise ValueError(f"include={include!r}, exclude={exclude!r}, every={every} leave none of the FFNs {paths} to convert")
    extra = {"drop_fraction": drop_fraction, "split_by": split_by}
    done = rewrite(model, chosen, num_experts=num_experts, top_k=top_k, init=init, **extra, **options)
    for match, reason in done.skipped:
        log.warning("not converting %s: %s", match.path, reason)
    if not done.converted:  # every FFN was refused before any change: the model is as it was
        reasons = "; ".join(reason for _, reason in done.skipped)
        raise NoFFNFound(f"none of the FFNs of {type(model).__name__} can be rewritten: {reasons}")
    log.info("converted %d FFNs of %s", len(done.converted), type(model).__name__)
    return model


def _nothing_found(model: nn.Module, found: FFNSearch) -> str:
    message = f"no feed-forward block found in {type(model).__name__}"
    if not found.rejected:
        return message + " (no linear → activation → linear pattern over the feature axis)"
    reasons = "\n".join(f"  {r.path}: {r.reason}" for r in found.rejected)
    return f"{message}; candidates rejected:\n{reasons}"
