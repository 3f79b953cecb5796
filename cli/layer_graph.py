"""The graph one MoE layer runs, for ``moefx inspect``: the layer is exported with a symbolic
token count, and each op is listed with its output shapes in terms of ``T`` (tokens).

    route → plan_dispatch → gather_grouped_linear → (activation) → grouped_linear_combine
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
from torch import fx
from torch.export import Dim

from moefx.layer import MoE

# Bookkeeping nodes that say nothing about the computation.
_HIDDEN = {operator.getitem, torch.ops.aten.sym_size.int, torch.ops.aten._assert_tensor_metadata.default,
           torch.ops.aten.promote_types.default}


@dataclass(frozen=True)
class GraphStep:
    name: str
    op: str  # "moefx::route", "aten::silu", ...
    shapes: tuple[str, ...]  # output shapes, e.g. "(2*T, 64)"
    inputs: tuple[str, ...]  # the names of the steps (or weights, or "x") it reads


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
    steps = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target in _HIDDEN:
            continue
        steps.append(GraphStep(
            name=node.name, op=_op(node), shapes=_shapes(node.meta.get("val"), token_symbol),
            inputs=tuple(names.get(n.name, n.name) for n in _sources(node)),
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


def _display_names(program) -> dict[str, str]:
    """Placeholders by the parameter they are (``router.weight``), not export's ``p_router_weight``."""
    signature = program.graph_signature
    names = dict(signature.inputs_to_parameters)
    names.update(signature.inputs_to_buffers)
    return names
