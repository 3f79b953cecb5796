"""Where an FFN's MoE goes in the module tree, and which modules make up its activation.

The graph is only for analysis; the output is the user's module with submodules replaced. A
matched region is covered by the shallowest module calls that compute nothing but the region:

- ``swap``: one module call is the whole FFN (``LlamaMLP``, T5's ``DenseReluDense``): that
  module is replaced by the MoE.
- ``fold``: a chain of module calls makes the FFN (BERT's ``intermediate`` (dense + act), then
  ``output.dense``; GPT-2's ``c_fc``, ``act``, ``c_proj`` next to a dropout that must stay): the
  first becomes the MoE, the others ``Folded`` pass-throughs, so the code around them (BERT's
  dropout + residual + LayerNorm) runs unchanged.
- ``inline``: the FFN is written in a bigger forward (``F.linear`` on parameters): that forward
  is re-traced with ``torch.fx`` and the region replaced by a call to a new MoE submodule. The
  forward of the model itself (parent ``""``) is rewritten the same way: the object stays.

The activation is a list of pieces, described here and built by ``rewrite``: a module the FFN
calls (moved into the MoE as it is, so it keeps its own train/eval behaviour and parameters), a
functional dropout (an ``nn.Dropout``), or pointwise nodes, copied out as a ``Subgraph`` and named
by the activation catalogue (a named one becomes the catalogue's module, any other the nodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import fx

from moefx.passes.graph.activation_subgraph import Subgraph, extract
from moefx.passes.graph.ops import LAYOUT, TRANSPARENT, arg, module_scope, op_name, tensor_inputs

_DROPOUTS = frozenset({"dropout", "feature_dropout", "alpha_dropout"})


@dataclass(frozen=True)
class Piece:
    """One step of the activation, one of: a module of the model (by path), a functional dropout
    (its probability), or pointwise ops (their subgraph, and the catalogue's name for it)."""

    path: str | None = None
    dropout: float | None = None
    ops: Subgraph | None = None
    name: str | None = None  # what ``ops`` computes: a catalogue name, or "elementwise"


@dataclass(frozen=True)
class Placement:
    how: Literal["swap", "fold", "inline"]
    path: str  # the MoE's module path after the rewrite
    folded: tuple[str, ...] = ()  # fold: modules that become pass-throughs
    parent: str = ""  # inline: the module whose forward is re-traced
    pieces: tuple[Piece, ...] = ()


class ScopeIndex:
    """Every module call key of a graph → the nodes it computes."""

    def __init__(self, graph: fx.Graph) -> None:
        self.nodes: dict[str, set[fx.Node]] = {}
        self.paths: dict[str, str] = {}
        for node in graph.nodes:
            if node.op in ("get_attr", "placeholder", "output"):
                continue
            for key, path, _ in module_scope(node):
                self.nodes.setdefault(key, set()).add(node)
                self.paths[key] = path

    def cover(self, node: fx.Node, allowed: set[fx.Node]) -> str | None:
        """The shallowest module call around ``node`` that computes only ``allowed`` nodes."""
        for key, path, _ in module_scope(node):
            if path and self.nodes.get(key, set()) <= allowed:
                return key
        return None


def place(calls: list[list[fx.Node]], entry: fx.Node, act_nodes, act_source, mid_union, gm, index: ScopeIndex):
    """A ``Placement`` for an FFN whose calls computed ``calls``, or a reason it cannot be placed."""
    pieces = _pieces(act_nodes, act_source, mid_union, gm, index)
    if isinstance(pieces, str):
        return pieces
    region = calls[0]
    allowed = set().union(*map(set, calls))
    covers = [index.cover(n, allowed) for n in region]
    keys = list(dict.fromkeys(k for k in covers if k is not None))
    loose = [n for n, k in zip(region, covers) if k is None]
    if len(keys) == 1 and not loose:
        return Placement("swap", index.paths[keys[0]], pieces=pieces)
    if keys and _is_chain(region, entry, covers, keys, loose, index, gm):
        paths = [index.paths[k] for k in keys]
        return Placement("fold", paths[0], folded=tuple(paths[1:]), pieces=pieces)
    parent = _common_scope(region)  # "": the forward of the model itself, rewritten the same way
    up_weight = next(n for n in region if n.op == "call_function" and op_name(n) == "moefx.linear").args[1]
    relative = up_weight.target.removeprefix(parent + ".").removesuffix(".weight").replace(".", "_")
    return Placement("inline", f"{parent}.{relative}_moe" if parent else f"{relative}_moe", parent=parent, pieces=pieces)


def _is_chain(region, entry, covers, keys, loose, index, gm) -> bool:
    """Whether the covering calls run one after another: entry → first → ... → last."""
    if any(op_name(n, gm) not in TRANSPARENT for n in loose):
        return False
    first = set(index.nodes[keys[0]])
    if any(entry in tensor_inputs(n) and n not in first for n in region):
        return False
    previous_out = None
    for i, key in enumerate(keys):
        members = {n for n, k in zip(region, covers) if k == key}
        external = {x for n in members for x in tensor_inputs(n) if x not in members}
        if i == 0:
            if external - {entry}:
                return False
        else:
            external = {_through(x, loose) for x in external}
            if external != {previous_out}:
                return False
        outputs = [n for n in members if any(u not in members for u in n.users)]
        if len(outputs) != 1:
            return False
        previous_out = outputs[0]
    return True


def _through(node, loose):
    while node in loose:
        node = tensor_inputs(node)[0]
    return node


def _common_scope(region) -> str:
    scopes = [module_scope(n) for n in region]
    common = ""
    for entries in zip(*scopes):
        if len({e[0] for e in entries}) != 1:
            break
        common = entries[0][1]
    return common


def _pieces(act_nodes, source, mid_union, gm, index: ScopeIndex):
    """The activation as a list of pieces, or a reason it cannot be rebuilt."""
    pieces, run, run_key = [], [], object()
    run_source = source

    def flush():
        nonlocal run, run_source
        if run:
            ops = extract(gm, run, run_source, skip=_skipped)
            pieces.append(Piece(ops=ops, name=ops.name(gm)))
            run_source = run[-1]
            run = []

    for node in act_nodes:
        name = op_name(node, gm)
        if name in LAYOUT:
            return f"a `{name}` between the projections cannot be kept in a converted layer"
        key = index.cover(node, mid_union)
        if key is not None:
            if key != run_key:
                flush()
                pieces.append(Piece(path=index.paths[key]))
                run_key = key
            run_source = node
            continue
        run_key = object()
        if name in _DROPOUTS:
            flush()
            pieces.append(Piece(dropout=float(arg(node, 1, "p", 0.5))))
            run_source = node
        elif name in TRANSPARENT:
            continue
        else:
            params = [a for a in node.all_input_nodes if a.op == "get_attr"]
            if params:
                return f"`{name}` between the projections uses the parameter `{params[0].target}` outside a module of its own"
            run.append(node)
    flush()
    return tuple(pieces)


def _skipped(node: fx.Node) -> bool:
    return op_name(node) in TRANSPARENT
