"""A candidate FFN as find_ffn's walk finds it (``Region``), and the checks it must pass (``verify``).

    Region: entry ─▶ [gate,] up ─▶ <act nodes> [* up] ─▶ down        nodes: all of them but the entry
    verify(region) ─▶ None (an FFN), or the reason it is not one, in words

A region is kept when it is not inside an existing MoE layer, its projections' weights and biases
are parameters, its shapes are d → h → d, its input's last axis is the feature axis (1x1
convolutions: axis 1, elementwise ops only), and it is a single-entry single-exit region whose
intermediates are used nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from moefx.passes.graph import normal_form
from moefx.passes.graph.dominance import Dominance
from moefx.passes.graph.feature_axis import feature_axis
from moefx.passes.graph.normal_form import Linear
from moefx.passes.graph.ops import ROUTING, TRANSPARENT, is_pointwise, module_scope, op_name, shape_of


@dataclass
class Region:
    """One call of a candidate FFN: its projections and the nodes between them."""

    down: Linear
    up: Linear
    gate: Linear | None
    fused: bool
    gate_first: bool
    entry: fx.Node  # the input the projections read
    nodes: list[fx.Node]  # every node of the region but the entry, topologically ordered
    act_nodes: list[fx.Node]  # the activation's nodes (the gate branch, or the whole mid of a plain MLP)
    act_source: fx.Node  # what the activation reads (the gate or up projection's output, or its half)
    rowwise_mid: bool  # a row-wise op (a norm) among the mid nodes


def routing_scopes_of(graph: fx.Graph, gm) -> dict[str, str]:
    """Module call keys that route tokens (the router and the layer around it) → their path."""
    scopes = {}
    for node in graph.nodes:
        name = op_name(node, gm)
        if name == "module:MoE":  # a moefx layer kept whole by symbolic_trace
            scopes[node.target] = f"{node.target} (MoE)"
        if name in ROUTING or name == "module:MoE":
            scopes.update((key, f"{path} ({cls})") for key, path, cls in module_scope(node)[-2:] if path)
    return scopes


def verify(region: Region, gm, routing_scopes: dict, dominance: Dominance) -> str | None:
    """None when ``region`` is an FFN to convert, else why not (``routing_scopes``: ``routing_scopes_of``)."""
    for node in region.nodes:
        for key, _, _ in module_scope(node):
            if key in routing_scopes:
                return f"inside `{routing_scopes[key]}`, which already routes tokens to experts (an existing MoE layer)"
    projections = [region.up, region.down] + ([region.gate] if region.gate else [])
    for lin in projections:
        if lin.weight is None:
            return f"the weight of `{lin.label}` is not a parameter (computed at run time, or a buffer)"
        if not lin.bias_is_param:
            return f"the bias of `{lin.label}` is not a parameter"
    d, h = region.up.in_features, region.up.out_features // (2 if region.fused else 1)
    if region.gate is not None and (region.gate.in_features, region.gate.out_features) != (d, h):
        return f"gate projection maps {region.gate.in_features} → {region.gate.out_features}, up maps {d} → {h}"
    if region.down.in_features != h:
        return f"down projection reads {region.down.in_features} features, the up projection gives {h}"
    if region.down.out_features != d:
        return f"maps {d} → {h} → {region.down.out_features}: not d → h → d (the output width differs from the input's)"
    if len({lin.channels_first for lin in projections}) > 1:
        return "mixes 1x1 convolutions and linears: its projections read different axes"
    if region.up.channels_first:
        odd = next((n for n in region.nodes if not normal_form.is_linear(n) and not _elementwise_alone(n, gm)), None)
        if odd is not None:
            return (
                f"`{op_name(odd, gm)}` between its 1x1 convolutions: a channels-first FFN converts with elementwise "
                "ops only between its projections (no reshapes, norms or per-channel parameters)"
            )
    axis = feature_axis(region.entry, gm)
    if axis is not None and axis != -1 and not region.up.channels_first:
        return (
            f"token-mixing MLP: its input's last axis is not the feature axis (features are on axis {axis}), "
            "so it acts across the sequence, not on each token"
        )
    shape = shape_of(region.entry)
    if region.up.channels_first and axis is not None and shape is not None and axis % len(shape) != 1:
        return (  # a 1x1 convolution reads axis 1: over [batch, sequence, features] that is the sequence
            f"token-mixing MLP: its 1x1 convolutions read axis 1, but its input's features are on axis {axis}, "
            "so it acts across the sequence, not on each token"
        )
    inside = set(region.nodes)
    y = region.down.node
    for node in region.nodes:
        outside = [u for u in node.users if u not in inside] if node is not y else []
        if outside:
            return f"intermediate `{node.name}` is also used outside the block (by `{outside[0].name}`)"
    for node in region.nodes:
        if not dominance.dominates(region.entry, node):
            return f"not single-entry: `{node.name}` reads a value computed outside the block"
        if not dominance.post_dominates(y, node):
            return f"not single-exit: `{node.name}` reaches the model's outputs without passing through `{y.name}`"
    return None


def _elementwise_alone(node: fx.Node, gm) -> bool:
    """An op that acts on each element by itself, reading no parameter or constant (whose shape
    would broadcast against channels-first input, not against the MoE's rows)."""
    if any(n.op == "get_attr" for n in node.all_input_nodes):
        return False
    return op_name(node, gm) in TRANSPARENT or is_pointwise(node, gm)
