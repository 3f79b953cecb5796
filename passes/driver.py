"""The pass pipeline: capture → canonicalize → find_ffn → plan → rewrite, and the public entry points."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from moefx.layer.routers import refuse_expert_choice
from moefx.model import moe_layers
from moefx.passes.adopt import adopt_blocks, adopted_record, check_init, undo
from moefx.passes.canonicalize import canonicalize
from moefx.passes.capture import capture
from moefx.passes.find_ffn import FFNMatch, FFNSearch, find_ffn
from moefx.passes.options import ConversionOptions
from moefx.passes.plan import plan
from moefx.passes.record import (
    Conversion,
    ConvertedFFN,
    UnrecordableInput,
    add_conversion,
    conversions,
    input_spec,
    set_conversions,
)
from moefx.passes.rewrite import rewrite
from moefx.passes.router_calibration import CalibrationInputs, calibrate_routers, calibration_inputs, check_calibration

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
    model: nn.Module, num_experts: int | None = None, top_k: int | None = None, *, example_inputs=None,
    example_kwargs=None, init: str | None = None, gate: str = "topk", capacity_factor=None, include=None, exclude=None, every: int = 1,
    drop_fraction: float = 0.5, split_by: str = "contiguous", router_init: str | None = None, calibration=None,
    **moe_options,
) -> nn.Module:
    """Convert ``model``'s feed-forward blocks to MoE layers in place; returns the model.

    A model that is already converted is returned unchanged. Raises ``NoFFNFound`` (with every
    rejected candidate's reason) when there is nothing to convert, and ``ValueError`` when
    ``include``/``exclude``/``every`` leave nothing. What was done is recorded on the model
    (``moefx.passes.record``) for ``moefx.save``. ``router_init`` and ``calibration``: see
    ``moefx.init.router_init`` and ``moefx.passes.router_calibration``. ``seed=0`` (a keyword among
    ``moe_options``): each layer's random parts come from a generator seeded by it and the layer's path.

    Existing MoE blocks (Mixtral, Qwen-MoE, DeepSeek-V3, GPT-OSS, hand-written ones) are adopted
    first (``moefx.passes.adopt``): each becomes an MoE layer with its own weights and routing.
    ``num_experts`` (default 8), ``top_k`` (2) and ``init`` ("upcycle") apply to the dense FFNs; an
    explicit value that contradicts an adopted block raises ``AdoptionError`` naming it.
    """
    options = conversion_options(
        num_experts=8 if num_experts is None else num_experts, top_k=2 if top_k is None else top_k,
        init="upcycle" if init is None else init, gate=gate, capacity_factor=capacity_factor, include=include,
        exclude=exclude, every=every, drop_fraction=drop_fraction, split_by=split_by, router_init=router_init,
        **moe_options,
    )
    calibrating = calibration_inputs(options.router_init, calibration, example_inputs, example_kwargs)
    adoption = adopt_blocks(model, num_experts=num_experts, top_k=top_k)
    try:
        found = search(model, example_inputs, example_kwargs)
        check_init(model, adoption, init, dense_ffns=bool(found.matches))
    except BaseException:
        undo(model, adoption)  # nothing half-done: the blocks are put back
        raise
    if not found.matches and adoption.refused and not adoption.blocks and not any(True for _ in moe_layers(model)):
        refused = "".join(f"\n  {path}: {reason}" for path, reason in adoption.refused)
        raise NoFFNFound(f"{_nothing_found(model, found)}\nMoE blocks moefx cannot express:{refused}")
    recorded = conversions(model)
    if adoption.blocks or adoption.refused:  # recorded apart from the dense FFNs' conversion: load adopts first
        add_conversion(model, Conversion(
            options=options, converted=(), adopted={spec.path: adopted_record(spec, layer) for spec, layer in adoption.blocks},
            skipped=adoption.refused, example_inputs=_spec(example_inputs, example_kwargs),
        ))
    if not found.matches and any(True for _ in moe_layers(model)):
        log.info("%s is already converted: nothing new to convert", type(model).__name__)
        return model
    try:
        convert_found(model, found, options, example_inputs=example_inputs, example_kwargs=example_kwargs,
                      calibration=calibrating)
    except BaseException:
        set_conversions(model, recorded)
        undo(model, adoption)
        raise
    return model


def conversion_options(
    *, num_experts: int, top_k: int, init: str = "upcycle", gate: str = "topk", capacity_factor=None, include=None,
    exclude=None, every: int = 1, drop_fraction: float = 0.5, split_by: str = "contiguous", router_init=None,
    seed: int = 0, **moe_options,
) -> ConversionOptions:
    """moefy's options as a ``ConversionOptions``, from moefy's keywords (checked: a bad value raises
    ``ValueError`` naming it) before any work."""
    return ConversionOptions(
        num_experts=num_experts, top_k=top_k, init=init, gate=gate, capacity_factor=capacity_factor, include=include,
        exclude=exclude, every=every, drop_fraction=drop_fraction, split_by=split_by, router_init=router_init,
        seed=seed, moe_options=moe_options,
    )


def convert_found(
    model: nn.Module, found: FFNSearch, options: ConversionOptions, *, example_inputs=None, example_kwargs=None,
    on_stage: Stage | None = None, calibration: CalibrationInputs | None = None,
) -> Conversion:
    """Rewrite the FFNs of ``found`` (from ``search(model)``) that ``options`` choose; the record of it.
    ``router_init="kmeans"`` runs ``calibration`` (default: the example inputs) through the result."""
    if not found.matches:
        raise NoFFNFound(_nothing_found(model, found))
    refuse_expert_choice(model, options.gate)  # before any change to the model
    build = options.as_dict()  # rewrite's keywords: every option but the choice of FFNs
    include, exclude, every = build.pop("include"), build.pop("exclude"), build.pop("every")
    if options.router_init == "kmeans":  # set after the rewrite, from a forward
        build["router_init"] = "random"
        calibration = calibration or calibration_inputs("kmeans", None, example_inputs, example_kwargs)
    check_calibration(model, calibration if options.router_init == "kmeans" else None)
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
    layers = [(c.match.path, c.layer) for c in done.converted]
    calibrated = calibrate_routers(model, layers, calibration if options.router_init == "kmeans" else None)
    conversion = Conversion(
        options=options,
        converted=tuple(
            ConvertedFFN(m.path, m.kind, m.d_model, m.d_hidden, m.activation, m.bias, m.placement.how)
            for m in (c.match for c in done.converted)
        ),
        skipped=tuple((m.path, why) for m, why in chosen.skipped + done.skipped),
        rejected=tuple((r.path, r.reason) for r in found.rejected),
        example_inputs=_spec(example_inputs, example_kwargs),
        router_calibration=calibrated,
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
