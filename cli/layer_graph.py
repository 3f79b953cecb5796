"""The graph one MoE layer runs, for ``moefx inspect``: the layer is exported with a symbolic
token count, and each op is listed with its output shapes in terms of ``T`` (tokens).

    route → plan_dispatch → gather_grouped_linear → (activation) → grouped_linear_combine

Each value also gets a name in the layer's own terms (``x`` for the input, ``router.weight``,
``logits``, ``weights``/``expert_ids``/``counts`` for what ``route`` returns, ..., ``out``), and
the casts and reshapes that change no shape are marked as not ``shown``: the terminal view folds
them into the value they read (``x`` rather than ``to`` of ``reshape`` of ``x``).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx
from torch.export import Dim

from moefx.layer.moe import MoE

# Bookkeeping nodes that say nothing about the computation.
_HIDDEN = {operator.getitem, torch.ops.aten.sym_size.int, torch.ops.aten._assert_tensor_metadata.default,
           torch.ops.aten.promote_types.default}

# Ops that only cast or re-lay a tensor: with the shape unchanged, their output is their input.
_LAYOUT = {"reshape", "view", "to", "_to_copy", "contiguous", "clone", "alias", "flatten", "type_as", "detach"}

# What the moefx ops that return several tensors return, in order (their schemas name no outputs).
_OUTPUTS = {
    "moefx::route": ("weights", "expert_ids", "counts"),
    "moefx::plan_dispatch": ("row_slot", "slot_row", "offsets"),
    "moefx::permute": ("x_sorted", "row_slot", "slot_row", "offsets"),
}

# A value read by a moefx op is named by what that op's argument is (``route(logits_TE, ...)``).
_ARGUMENTS = {"logits_TE": "logits", "h_S2H": "gate_up", "h_SI": "hidden", "x_SI": "hidden", "y_SD": "y_sorted"}


@dataclass(frozen=True)
class GraphStep:
    name: str  # the node's name in the exported graph
    op: str  # "moefx::route", "aten::silu", ...
    shapes: tuple[str, ...]  # output shapes, e.g. "(2*T, 64)"
    inputs: tuple[str, ...]  # the names of the steps (or weights, or "x") it reads
    outputs: tuple[str, ...] = ()  # its outputs in the layer's terms: "weights", "expert_ids", "counts"
    reads: tuple[str, ...] = ()  # what it reads in the layer's terms: "x", "router.weight", "expert_ids"
    shown: bool = True  # False: a cast or reshape that changes no shape (the terminal view folds it in)


def layer_graph(layer: MoE, tokens: int = 16) -> list[GraphStep]:
    weight = layer.experts.in_proj
    device = "meta" if weight.is_meta else weight.device
    x = torch.zeros(tokens, layer.config.d_model, dtype=weight.dtype, device=device)
    was_training = layer.training
    try:
        program = torch.export.export(layer.eval(), (x,), dynamic_shapes=({0: Dim("T", min=2)},), strict=False)
    finally:
        layer.train(was_training)
    graph = program.graph
    token_symbol = str(next(n for n in graph.nodes if n.op == "placeholder" and n.name == "x").meta["val"].shape[0])
    names = _display_names(program)
    steps_nodes = [n for n in graph.nodes if n.op == "call_function" and n.target not in _HIDDEN]
    same = _aliases(steps_nodes)
    labels = _labels(graph, names, same, gated=layer.config.gated)
    steps = []
    for node in steps_nodes:
        sources = _sources(node)
        steps.append(GraphStep(
            name=node.name, op=_op(node), shapes=_shapes(node.meta.get("val"), token_symbol),
            inputs=tuple(names.get(n.name, n.name) for n in sources),
            outputs=_outputs(node, labels, same),
            reads=tuple(dict.fromkeys(_label_of(n, labels, same) for n in _tensor_inputs(node))),
            shown=node not in same,
        ))
    return steps


def _op(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}::{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


def _shapes(value, token_symbol: str) -> tuple[str, ...]:
    values = value if isinstance(value, (tuple, list)) else (value,)
    pattern = re.compile(rf"\b{re.escape(token_symbol)}\b")
    return tuple(pattern.sub("T", str(tuple(v.shape))) for v in values if isinstance(v, torch.Tensor))


def _sources(node: fx.Node) -> list[fx.Node]:
    """The nodes it reads, looking through getitem (``route[1]`` reads ``route``)."""
    sources = []
    for n in node.all_input_nodes:
        while n.op == "call_function" and n.target is operator.getitem:
            n = n.args[0]
        if n.op == "call_function" and n.target in _HIDDEN:
            continue
        if n not in sources:
            sources.append(n)
    return sources


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The tensors it reads, a getitem kept as itself (``route[1]`` is ``expert_ids``, not ``route``)."""
    return [n for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]


def _aliases(nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Each cast or reshape that keeps its input's shape, mapped to the value it re-lays."""
    same = {}
    for node in nodes:
        op = _op(node).split("::")[-1]
        inputs = _tensor_inputs(node)
        value = node.meta.get("val")
        if op in _LAYOUT and len(inputs) == 1 and isinstance(value, torch.Tensor):
            source = inputs[0].meta["val"]
            if tuple(source.shape) == tuple(value.shape):
                same[node] = same.get(inputs[0], inputs[0])
    return same


def _labels(graph: fx.Graph, names: dict[str, str], same: dict[fx.Node, fx.Node], gated: bool) -> dict[fx.Node, str]:
    """A name for each value in the layer's terms; a name is given once (else the node's own)."""
    labels: dict[fx.Node, str] = {}
    used: set[str] = set()

    def give(node: fx.Node, label: str) -> None:
        if node not in labels and label not in used:
            labels[node] = label
            used.add(label)

    for node in graph.nodes:
        if node.op == "placeholder":
            give(node, names.get(node.name, node.name))
    output = next(n for n in graph.nodes if n.op == "output")
    returned = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    if isinstance(returned, fx.Node):
        give(same.get(returned, returned), "out")
    moefx_ops = [n for n in graph.nodes if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "moefx"]
    for node in graph.nodes:  # the outputs of route, plan_dispatch, permute, by their place
        if node.target is operator.getitem and node.args[0] in moefx_ops and _op(node.args[0]) in _OUTPUTS:
            give(node, _OUTPUTS[_op(node.args[0])][node.args[1]])
    for node in moefx_ops:
        if _op(node) == "moefx::gather_grouped_linear":
            give(node, "gate_up" if gated else "up")
    for node in moefx_ops:  # a value by the argument of the moefx op that reads it
        for arg, value in zip(node.target._schema.arguments, node.args):
            if isinstance(value, fx.Node) and arg.name in _ARGUMENTS:
                give(same.get(value, value), _ARGUMENTS[arg.name])
    return labels


def _label_of(node: fx.Node, labels: dict[fx.Node, str], same: dict[fx.Node, fx.Node]) -> str:
    node = same.get(node, node)
    return labels.get(node, node.name)


def _outputs(node: fx.Node, labels: dict[fx.Node, str], same: dict[fx.Node, fx.Node]) -> tuple[str, ...]:
    op = _op(node)
    if op in _OUTPUTS:  # named by the getitems that read them, or by their place
        picked = {user.args[1]: labels.get(user) for user in node.users if user.target is operator.getitem}
        return tuple(picked.get(i) or name for i, name in enumerate(_OUTPUTS[op]))
    return (_label_of(node, labels, same),)


def _display_names(program) -> dict[str, str]:
    """Placeholders by the parameter they are (``router.weight``), not export's ``p_router_weight``."""
    signature = program.graph_signature
    names = dict(signature.inputs_to_parameters)
    names.update(signature.inputs_to_buffers)
    return names
