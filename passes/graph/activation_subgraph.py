"""An activation as a subgraph: the chain of pointwise nodes between an FFN's projections, copied
out of the captured graph.

    captured graph                        Subgraph (a graph of its own: one input, one output)
      %h = linear(%x, up)                   %x = placeholder
      %s = mul(%h, 1.702)                   %s = mul(%x, 1.702)
      %g = sigmoid(%s)               ─▶     %g = sigmoid(%s)
      %a = mul(%h, %g)                      %a = mul(%x, %g)
      %y = linear(%a, down)                 output(%a)                  name(): "quick_gelu"

An activation can be one node (``aten.gelu``), several (GPT-2's tanh formula), or something no
list anticipates. The subgraph is data (a graph, the constants it reads, the paths of the modules
it calls), not a module: the analysis carries it, ``module`` builds one where the rewrite needs it,
and ``name`` asks the activation catalogue (``moefx.layer.activations``) what it computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from torch import fx, nn

from moefx.layer.activations import identify
from moefx.passes.graph.ops import detached_copy, tensor_inputs

ELEMENTWISE = "elementwise"  # the name of a pointwise function the catalogue does not know


@dataclass(frozen=True, eq=False)
class Subgraph:
    """Pointwise nodes copied out of a graph: a function of one tensor ``x``."""

    graph: fx.Graph  # owned by no module
    constants: tuple[tuple[str, Any], ...] = ()  # (get_attr target, value) the nodes read
    modules: tuple[str, ...] = ()  # call_module targets (symbolic_trace's leaf modules): paths in the model

    def module(self, root: nn.Module) -> fx.GraphModule:
        """The subgraph as a module of its own (a fresh copy of the graph each time), calling the
        modules of ``root`` (the model, or the graph it was copied from) at its module paths."""
        attributes = dict(self.constants) | {path: root.get_submodule(path) for path in self.modules}
        return fx.GraphModule(attributes, detached_copy(self.graph), "Elementwise")

    def name(self, root: nn.Module) -> str:
        """The catalogue's name for what it computes, else ``"elementwise"``."""
        return identify(self.module(root)) or ELEMENTWISE


def extract(
    gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node, skip: Callable[[fx.Node], bool] | None = None,
) -> Subgraph:
    """The subgraph computing ``nodes`` (topologically ordered, ending at the result) from ``source``.

    Inputs for which ``skip`` is true are looked through (their own input is used instead).
    Raises ``ValueError`` when a node reads a value computed outside the chain.
    """
    graph = fx.Graph()
    env = {source: graph.placeholder("x")}
    constants = {}

    def lookup(node: fx.Node) -> fx.Node:
        while node not in env:
            if node.op == "get_attr":
                env[node] = graph.node_copy(node)
                constants[node.target] = attrgetter(node.target)(gm)
            elif skip is not None and skip(node) and tensor_inputs(node):
                node = tensor_inputs(node)[0]
            else:
                raise ValueError(f"`{node.name}` is read by the activation but computed outside it")
        return env[node]

    for node in nodes:
        env[node] = graph.node_copy(node, lookup)
    graph.output(env[nodes[-1]])
    modules = tuple(dict.fromkeys(n.target for n in nodes if n.op == "call_module"))
    return Subgraph(graph, tuple(constants.items()), modules)
