"""find_ffn: every feed-forward block in a canonicalized graph, and why each other candidate is not one.

    before (a canonicalized graph)           after (analysis only: the graph is not changed)
      %h = linear(%x, mlp.up.weight)           FFNMatch(path="mlp", kind="mlp", d_model=16, d_hidden=64,
      %a = gelu(%h)                                     activation="gelu", up="mlp.up.weight", ...)
      %y = linear(%a, mlp.down.weight)         Rejected(path="attn.o_proj", reason="attention projection: ...")

    forms:  plain  down(act(up(x)))
            gated  down(act(gate(x)) * up(x))
            fused  g, u = gate_up(x).chunk(2, -1); down(act(g) * u)

From every linear (a possible down projection) the walk goes back through row-wise ops (pointwise
ops, dropout, casts, views that keep the last axis, norms over the last axis, the gate product,
the halves of a fused projection; ``graph.rows``) to the linears that feed it. A candidate of one
of the three forms is kept when ``region.verify`` accepts it: shapes d → h → d, parameters for
weights and biases, not inside an existing MoE layer, the feature axis last, a single-entry
single-exit region whose intermediates are used nowhere else. Calls of the same weights (one FFN
module run by several layers) make one match. Where the MoE goes in the module tree is decided by
``placement``. The pass builds no module: a match describes the activation (its catalogue name,
the model's modules or the ops it is made of) and ``rewrite`` builds it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import takewhile

from torch import fx

from moefx.passes.graph import normal_form
from moefx.passes.graph.activation_subgraph import ELEMENTWISE, extract
from moefx.passes.graph.dominance import Dominance
from moefx.passes.graph.normal_form import Linear
from moefx.passes.graph.ops import CASTS, TRANSPARENT, module_scope, op_name, tensor_inputs
from moefx.passes.graph.rows import LOOK_THROUGH, attention_source, half_of, row_kind
from moefx.passes.placement import Placement, ScopeIndex, place
from moefx.passes.region import Region, routing_scopes_of, verify

_MAX_REGION = 96  # nodes between the projections; real FFNs use a few dozen at most


@dataclass(frozen=True)
class FFNMatch:
    """One feed-forward block: what it computes and where the MoE that replaces it goes."""

    path: str  # module path the MoE will have
    kind: str  # "mlp" (plain) or "glu" (gated)
    d_model: int
    d_hidden: int
    activation: str  # "silu", "gelu_tanh", ... or "elementwise" / "rowwise" for other functions
    bias: bool
    up: str  # weight parameter names, as in model.named_parameters()
    down: str
    gate: str | None = None
    fused: bool = False  # gate and up are the halves of one projection
    gate_first: bool = True  # for a fused projection: the gate is the first half
    up_transposed: bool = False  # weights stored [in, out] (GPT-2's Conv1D)
    down_transposed: bool = False
    channels_first: bool = False  # 1x1 convolutions: the features are axis 1 of the input (N, C, ...)
    up_bias: str | None = None
    gate_bias: str | None = None
    down_bias: str | None = None
    rowwise_mid: bool = False  # the ops between the projections mix neurons (a norm): no 'split' init
    calls: int = 1  # how many times the graph runs it (a shared FFN module: > 1)
    location: str = ""  # graph nodes of its first call, "up → down"
    placement: Placement | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Rejected:
    """A candidate that is not converted, and why, in words."""

    path: str
    reason: str


@dataclass(frozen=True)
class FFNSearch:
    matches: tuple[FFNMatch, ...]
    rejected: tuple[Rejected, ...]


def find_ffn(gm: fx.GraphModule) -> FFNSearch:
    regions, rejected = _search(gm)
    matches, unplaced = _group(regions, gm)
    return FFNSearch(tuple(matches), tuple(_dedupe(rejected + unplaced)))


def find_regions(gm: fx.GraphModule) -> list[Region]:
    """The verified FFN regions of ``gm``, one per call (the inline rewrite's view)."""
    return _search(gm)[0]


def _search(gm: fx.GraphModule) -> tuple[list[Region], list[Rejected]]:
    graph = gm.graph
    linears = {n: normal_form.read_linear(n, gm) for n in graph.nodes if normal_form.is_linear(n)}
    regions, rejected = [], []
    for down in linears.values():
        found = _walk(down, linears, gm)
        if isinstance(found, Rejected):
            rejected.append(found)
        elif found is not None:
            regions.append(found)
    if not regions:
        return [], rejected
    dominance, routing_scopes = Dominance(graph), routing_scopes_of(graph, gm)
    kept = []
    for region in regions:
        reason = verify(region, gm, routing_scopes, dominance)
        if reason:
            rejected.append(Rejected(_path_of(region.down.node), reason))
        else:
            kept.append(region)
    return kept, rejected


# ── the walk back from a down projection ─────────────────────────────────────────────────────


def _walk(down: Linear, linears: dict, gm) -> Region | Rejected | None:
    """The region feeding ``down``; None when no linear feeds it through row-wise ops."""
    mid, leaves, frontier = [], [], [down.input]
    seen = set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > _MAX_REGION:
            return None
        if node in linears:
            leaves.append((linears[node], None, node))
            continue
        half = half_of(node, linears)
        if half is not None:
            leaves.append((linears[half[0]], half[1], node))
            mid.append(node)
            if node.args[0] not in linears:  # the split op the half comes from
                mid.append(node.args[0])
            continue
        kind = row_kind(node, gm)
        if kind is None:
            source = attention_source(node, gm) if all(op_name(n, gm) in LOOK_THROUGH for n in mid) else None
            if source is not None:
                return Rejected(_path_of(down.node), f"attention projection: its input comes from `{source}`, which mixes tokens")
            return None
        mid.append(node)
        frontier.extend(tensor_inputs(node))
    if not leaves:
        return None
    return _classify(down, leaves, mid, gm)


def _classify(down: Linear, leaves: list, mid: list[fx.Node], gm) -> Region | Rejected | None:
    where = _path_of(down.node)
    mid = sorted(set(mid))  # fx nodes compare by their position in the graph
    distinct = {(lin.node, half) for lin, half, _ in leaves}
    linears = {lin.node: lin for lin, _, _ in leaves}
    rowwise = any(row_kind(n, gm) == "rowwise" for n in mid)
    if len(distinct) == 1 and next(iter(distinct))[1] is None:
        up = linears[next(iter(distinct))[0]]
        act = [n for n in mid if row_kind(n, gm) != "layout"]
        if all(op_name(n, gm) in TRANSPARENT for n in act):
            return None  # two linears in a row (a low-rank factorisation), not an FFN: no activation between
        return Region(down, up, None, False, True, up.input, [up.node, *mid, down.node], act, up.node, rowwise)
    if len(distinct) != 2:
        return Rejected(where, f"{len(distinct)} projections feed `{down.label}`: not up → act → down or a gated form")
    (a_node, a_half), (b_node, b_half) = sorted(distinct, key=lambda d: (d[0], d[1] or 0))
    fused = a_node is b_node
    if fused != (a_half is not None and b_half is not None):
        return Rejected(where, "a projection is used both whole and split in halves")
    sources = {(lin.node, half): src for lin, half, src in leaves}
    branch_a, branch_b, joint, post = _branches(mid, sources[(a_node, a_half)], sources[(b_node, b_half)])
    if joint is None:
        return Rejected(where, "the two projections are not joined by one product: not act(gate) * up")
    a_plain = all(op_name(n, gm) in TRANSPARENT or n is sources[(a_node, a_half)] for n in branch_a)
    b_plain = all(op_name(n, gm) in TRANSPARENT or n is sources[(b_node, b_half)] for n in branch_b)
    if not a_plain and not b_plain:
        return Rejected(where, "both inputs of the gate product are transformed: not act(gate) * up")
    # The transformed branch is the gate; with neither transformed (bilinear), the first one.
    gate_is_a = not a_plain or b_plain
    gate_key, up_key = ((a_node, a_half), (b_node, b_half)) if gate_is_a else ((b_node, b_half), (a_node, a_half))
    gate_branch = branch_a if gate_is_a else branch_b
    bad = [n for n in post if op_name(n, gm) not in TRANSPARENT and row_kind(n, gm) != "layout"]
    if bad:
        return Rejected(where, f"`{op_name(bad[0], gm)}` after the gate product is not supported (only dropout, casts, views)")
    gate, up = linears[gate_key[0]], linears[up_key[0]]
    entry = up.input if fused else _shared_input(gate.input, up.input, gm)
    if entry is None:
        return Rejected(where, "the gate and up projections read different inputs")
    act_source = sources[gate_key]
    act = [n for n in gate_branch if n is not act_source] + [n for n in post if op_name(n, gm) in ("dropout", "feature_dropout")]
    casts = [n for x in (gate.input, up.input) for n in takewhile(lambda n: n is not entry, _cast_chain(x, gm))]
    nodes = sorted({gate.node, up.node, *mid, down.node, *casts})
    return Region(down, up, None if fused else gate, fused, gate_key[1] in (None, 0), entry, nodes, act, act_source, rowwise)


def _branches(mid, source_a, source_b):
    """Nodes depending only on ``source_a``, only on ``source_b``, the product joining them, and after it."""
    deps = {source_a: {0}, source_b: {1}}
    for node in mid:
        if node in deps:
            continue
        d = set()
        for inp in tensor_inputs(node):
            d |= deps.get(inp, set())
        deps[node] = d
    joints = [
        n for n in mid
        if deps.get(n) == {0, 1} and not any(deps.get(i) == {0, 1} for i in tensor_inputs(n))
    ]
    if len(joints) != 1 or op_name(joints[0]) != "mul":
        return [], [], None, []
    joint = joints[0]
    a = [n for n in mid if deps.get(n) == {0}]
    b = [n for n in mid if deps.get(n) == {1}]
    after = [n for n in mid if deps.get(n) == {0, 1} and n is not joint]
    return a, b, joint, after


def _shared_input(a: fx.Node, b: fx.Node, gm) -> fx.Node | None:
    """The nearest value both projections read, through casts and copies (``gate(x.float()) * up(x)``).

    Nearest, not the end of the cast chain: a norm's closing ``.to(dtype)`` / ``type_as(x)`` feeds both
    projections, and may also feed attention (Cohere) or read the residual (Gemma); it is the entry.
    """
    chain = _cast_chain(a, gm)
    return next((node for node in _cast_chain(b, gm) if node in chain), None)


def _cast_chain(node: fx.Node, gm) -> list[fx.Node]:
    chain = [node]
    while op_name(node, gm) in CASTS | {"contiguous", "clone", "alias"}:
        node = tensor_inputs(node)[0]
        chain.append(node)
    return chain


# ── grouping calls, naming, placement ────────────────────────────────────────────────────────


def _group(regions: list[Region], gm) -> tuple[list[FFNMatch], list[Rejected]]:
    groups: dict[tuple, list[Region]] = defaultdict(list)
    for r in regions:
        groups[(r.up.weight, r.gate.weight if r.gate else None, r.down.weight)].append(r)
    mid_union = set()
    for r in regions:
        mid_union.update(n for n in r.nodes if not normal_form.is_linear(n))
    index = ScopeIndex(gm.graph)
    matches, rejected = [], []
    for calls in groups.values():
        first = calls[0]
        placement = place([r.nodes for r in calls], first.entry, first.act_nodes, first.act_source, mid_union, gm, index)
        if isinstance(placement, str):
            rejected.append(Rejected(_path_of(first.down.node), placement))
            continue
        matches.append(_match(first, len(calls), placement, gm))
    return matches, rejected


def _match(r: Region, calls: int, placement: Placement, gm) -> FFNMatch:
    up, down, gate = r.up, r.down, r.gate
    name = "identity" if not r.act_nodes else "rowwise" if r.rowwise_mid else _name(r, gm)
    return FFNMatch(
        path=placement.path, kind="glu" if (gate or r.fused) else "mlp", d_model=up.in_features,
        d_hidden=up.out_features // (2 if r.fused else 1), activation=name,
        bias=any(x.bias for x in (up, down, gate) if x is not None), up=up.weight, down=down.weight,
        gate=gate.weight if gate else None, fused=r.fused, gate_first=r.gate_first,
        up_transposed=up.transposed, down_transposed=down.transposed, channels_first=up.channels_first,
        up_bias=up.bias, gate_bias=gate.bias if gate else None, down_bias=down.bias, rowwise_mid=r.rowwise_mid,
        calls=calls, location=f"{up.node.name} → {down.node.name}", placement=placement,
    )


def _name(r: Region, gm) -> str:
    nodes = [n for n in r.act_nodes if op_name(n, gm) not in TRANSPARENT]
    if not nodes:
        return "identity"
    try:
        return extract(gm, nodes, r.act_source, skip=lambda n: op_name(n, gm) in TRANSPARENT).name(gm)
    except Exception:
        return ELEMENTWISE


def _path_of(node: fx.Node) -> str:
    scope = module_scope(node)
    return scope[-1][1] if scope else node.name


def _dedupe(rejected: list[Rejected]) -> list[Rejected]:
    seen, out = set(), []
    for r in rejected:
        if (r.path, r.reason) not in seen:
            seen.add((r.path, r.reason))
            out.append(r)
    return out


