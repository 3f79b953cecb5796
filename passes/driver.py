"""The pass pipeline: capture → canonicalize → find_ffn → plan → rewrite, and the public entry points."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from moefx.model import moe_layers
from moefx.passes.canonicalize import canonicalize
from moefx.passes.capture import capture
from moefx.passes.find_ffn import FFNMatch, FFNSearch, find_ffn
from moefx.passes.options import ConversionOptions
from moefx.passes.plan import plan
from moefx.passes.record import Conversion, ConvertedFFN, UnrecordableInput, add_conversion, input_spec
from moefx.passes.rewrite import rewrite

log = logging.getLogger(__name__)


class NoFFNFound(ValueError):
    """The model has no feed-forward block moefx can convert."""


Stage = Callable[[str], None]  # told "capture", "match" or "rewrite" as each begins (the CLI's progress)


def search(model: nn.Module, example_inputs=None, example_kwargs=None, *, on_stage: Stage | None = None) -> FFNSearch:
    """Every FFN of ``model`` and every rejected candidate with its reason (the model is not changed)."""
    stage = on_stage or (lambda name: None)
    stage("capture")
    captured = capture(model, example_inputs, example_kwargs)
    gm = captured.graph_module
    stage("match")
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
    ``include``/``exclude``/``every`` leave nothing. What was done is recorded on the model
    (``moefx.passes.record``) for ``moefx.save``.
    """
    options = conversion_options(
        num_experts=num_experts, top_k=top_k, init=init, gate=gate, capacity_factor=capacity_factor, include=include,
        exclude=exclude, every=every, drop_fraction=drop_fraction, split_by=split_by, **moe_options,
    )
    found = search(model, example_inputs, example_kwargs)
    if not found.matches and any(True for _ in moe_layers(model)):
        log.info("%s is already converted: nothing new to convert", type(model).__name__)
        return model
    convert_found(model, found, options, example_inputs=example_inputs, example_kwargs=example_kwargs)
    return model


def conversion_options(
    *, num_experts: int, top_k: int, init: str = "upcycle", gate: str = "topk", capacity_factor=None, include=None,
    exclude=None, every: int = 1, drop_fraction: float = 0.5, split_by: str = "contiguous", **moe_options,
) -> ConversionOptions:
    """moefy's options as a ``ConversionOptions``, from moefy's keywords (checked: a bad value raises
    ``ValueError`` naming it) before any work."""
    return ConversionOptions(
        num_experts=num_experts, top_k=top_k, init=init, gate=gate, capacity_factor=capacity_factor, include=include,
        exclude=exclude, every=every, drop_fraction=drop_fraction, split_by=split_by, moe_options=moe_options,
    )


def convert_found(
    model: nn.Module, found: FFNSearch, options: ConversionOptions, *, example_inputs=None, example_kwargs=None,
    on_stage: Stage | None = None,
) -> Conversion:
    """Rewrite the FFNs of ``found`` (from ``search(model)``) that ``options`` choose; the record of it."""
    if not found.matches:
        raise NoFFNFound(_nothing_found(model, found))
    build = options.as_dict()  # rewrite's keywords: every option but the choice of FFNs
    include, exclude, every = build.pop("include"), build.pop("exclude"), build.pop("every")
    chosen = plan(found.matches, include=include, exclude=exclude, every=every)
    if not chosen.convert:
        paths = [m.path for m in found.matches]
        raise ValueError(
            f"include={include!r}, exclude={exclude!r}, every={every} leave none "
            f"of the FFNs {paths} to convert: widen include, narrow exclude or lower every"
        )
    (on_stage or (lambda name: None))("rewrite")
    done = rewrite(model, chosen, example_inputs=example_inputs, example_kwargs=example_kwargs, **build)
    for match, reason in done.skipped:
        log.warning("not converting %s: %s", match.path, reason)
    if not done.converted:  # every FFN was refused before any change: the model is as it was
        reasons = "; ".join(reason for _, reason in done.skipped)
        raise NoFFNFound(f"none of the FFNs of {type(model).__name__} can be rewritten: {reasons}")
    log.info("converted %d FFNs of %s", len(done.converted), type(model).__name__)
    conversion = Conversion(
        options=options,
        converted=tuple(
            ConvertedFFN(m.path, m.kind, m.d_model, m.d_hidden, m.activation, m.bias, m.placement.how)
            for m in (c.match for c in done.converted)
        ),
        skipped=tuple((m.path, why) for m, why in chosen.skipped + done.skipped),
        rejected=tuple((r.path, r.reason) for r in found.rejected),
        example_inputs=_spec(example_inputs, example_kwargs),
    )
    add_conversion(model, conversion)
    return conversion


def _spec(example_inputs, example_kwargs) -> dict | None:
    if example_inputs is None and example_kwargs is None:
        return None
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    try:
        return input_spec((tuple(example_inputs or ()), dict(example_kwargs or {})))
    except UnrecordableInput as err:
        log.info("example inputs not recorded (%s): moefx.load will need them passed again", err)
        return None


def _nothing_found(model: nn.Module, found: FFNSearch) -> str:
    message = f"no feed-forward block found in {type(model).__name__}"
    if not found.rejected:
        return message + " (no linear → activation → linear pattern over the feature axis)"
    reasons = "\n".join(f"  {r.path}: {r.reason}" for r in found.rejected)
    return f"{message}; candidates rejected:\n{reasons}"
