"""Dominators and post-dominators of a graph's data flow (networkx), for region checks.

A candidate FFN is a single-entry single-exit region: its entry (the input it reads) dominates
every node in it (every path from the model's inputs to the node passes through the entry), and
its exit (the down projection) post-dominates every node in it (every path from the node to the
model's outputs passes through the exit). Parameters and buffers (get_attr) are not data flow.
"""

from __future__ import annotations

import networkx as nx
from torch import fx

from moefx.passes.graph.ops import tensor_inputs

_SOURCE, _SINK = "<inputs>", "<outputs>"


class Dominance:
    """Both dominator trees of ``graph``, with O(1) ancestor queries."""

    def __init__(self, graph: fx.Graph) -> None:
        flow = nx.DiGraph()
        flow.add_node(_SOURCE)
        flow.add_node(_SINK)
        for node in graph.nodes:
            if node.op == "get_attr":
                continue
            inputs = tensor_inputs(node)
            flow.add_node(node)
            if not inputs:
                flow.add_edge(_SOURCE, node)
            for inp in inputs:
                flow.add_edge(inp, node)
            if node.op == "output":
                flow.add_edge(node, _SINK)
        self._dom = _Intervals(nx.immediate_dominators(flow, _SOURCE), _SOURCE)
        self._pdom = _Intervals(nx.immediate_dominators(flow.reverse(copy=False), _SINK), _SINK)

    def dominates(self, a: fx.Node, b: fx.Node) -> bool:
        return self._dom.ancestor(a, b)

    def post_dominates(self, a: fx.Node, b: fx.Node) -> bool:
        return self._pdom.ancestor(a, b)


class _Intervals:
    """Entry/exit times of a DFS over a tree given as ``{node: parent}``."""

    def __init__(self, parent: dict, root) -> None:
        children: dict = {}
        for node, p in parent.items():
            if node is not root:
                children.setdefault(p, []).append(node)
        self._tin, self._tout, clock = {}, {}, 0
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if done:
                self._tout[node] = clock
            else:
                self._tin[node] = clock
                stack.append((node, True))
                stack.extend((c, False) for c in children.get(node, ()))
            clock += 1

    def ancestor(self, a, b) -> bool:
        """Whether ``a`` is ``b`` or an ancestor of it (False for nodes outside the tree)."""
        if a not in self._tin or b not in self._tin:
            return False
        return self._tin[a] <= self._tin[b] and self._tout[b] <= self._tout[a]
