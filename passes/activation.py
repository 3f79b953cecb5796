"""Activations as one class: any chain of pointwise ops on one tensor, named by what it computes.

An activation in a captured graph can be one node (``aten.gelu``), several (GPT-2's tanh
formula, ``x * sigmoid(1.702 * x)``), or something no list anticipates. ``extract`` copies such a
chain into a small module of its own; ``identify`` names it by evaluating it on a probe and
comparing with the known activations, so that a formula written by hand gets the same name
(``gelu_tanh``, ``quick_gelu``, ``relu2``...) as the library op; anything else is ``elementwise``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from moefx.passes.graph.ops import tensor_inputs

_KNOWN = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "relu2": lambda x: torch.relu(x).square(),
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "elu": F.elu,
    "softplus": F.softplus,
    "leaky_relu": F.leaky_relu,
    "hardswish": F.hardswish,
    "relu6": F.relu6,
}
_PROBE = torch.linspace(-6.0, 6.0, 481, dtype=torch.float64)


def extract(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node, skip=None) -> fx.GraphModule:
    """A module computing ``nodes`` (topologically ordered, ending at the result) from ``source``.

    Inputs for which ``skip`` is true are looked through (their own input is used instead).
    """
    graph = fx.Graph()
    env = {source: graph.placeholder("x")}

    def lookup(node: fx.Node) -> fx.Node:
        while node not in env:
            if node.op == "get_attr":
                env[node] = graph.node_copy(node)
            elif skip is not None and skip(node) and tensor_inputs(node):
                node = tensor_inputs(node)[0]
            else:
                raise ValueError(f"`{node.name}` is read by the activation but computed outside it")
        return env[node]

    for node in nodes:
        env[node] = graph.node_copy(node, lookup)
    graph.output(env[nodes[-1]])
    return fx.GraphModule(gm, graph, "Elementwise")


def identify(fn: nn.Module) -> str:
    """The name of the known activation ``fn`` computes, else ``"elementwise"``."""
    try:
        with torch.no_grad():
            y = fn(_PROBE.to(torch.float32)).to(torch.float64)
    except Exception:  # noqa: BLE001  (an op that cannot run on a probe is simply not named)
        return "elementwise"
    if y.shape != _PROBE.shape:
        return "elementwise"
    for name, ref in _KNOWN.items():
        expected = ref(_PROBE)
        if torch.all((y - expected).abs() <= 1e-5 * (1 + expected.abs())):
            return name
    return "elementwise"
