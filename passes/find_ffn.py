"""find_ffn: every feed-forward block in a canonicalized graph, and why each other candidate is not one.

    %h  = linear(%x, up)                 plain:  down(act(up(x)))
    %a  = <pointwise ops>(%h)            gated:  down(act(gate(x)) * up(x))
    %y  = linear(%a, down)               fused:  g, u = gate_up(x).chunk(2, -1); down(act(g) * u)

From every linear (a possible down projection) the walk goes back through row-wise ops (pointwise
ops, dropout, casts, views that keep the last axis, norms over the last axis, the gate product,
the halves of a fused projection) to the linears that feed it. A candidate is kept when:
- its form is one of the three above, with shapes d → h → d;
- its weights and biases are parameters;
- it is not inside an existing MoE layer (a module that routes with top-k);
- its input's last axis is the feature axis (not a token-mixing MLP);
- it is a single-entry single-exit region (``Dominance``) whose intermediates are used nowhere else.
Calls of the same weights (one FFN module run by several layers) make one match. Where the MoE
goes in the module tree is decided by ``placement``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import takewhile

from torch import fx

from moefx.passes import activation as activations
from moefx.passes.graph import normal_form
from moefx.passes.graph.dominance import Dominance
from moefx.passes.graph.feature_axis import feature_axis
from moefx.passes.graph.normal_form import Linear
from moefx.passes.graph.ops import (
    ATTENTION, CASTS, LAYOUT, PERMUTES, ROUTING, ROW_OPS, ROW_REDUCTIONS, TRANSPARENT, arg, is_pointwise,
    module_scope, op_name, shape_of, tensor_inputs,
)
from moefx.passes.placement import Placement, ScopeIndex, place

_MAX_REGION = 96  # nodes between the projections; real FFNs use a few dozen at most
_LOOK_THROUGH = LAYOUT | PERMUTES | TRANSPARENT
_SPLITS = frozenset({"chunk", "split", "split_with_sizes", "tensor_split", "unsafe_split"})


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


def find_regions(gm: fx.GraphModule) -> list[_Region]:
    """The verified FFN regions of ``gm``, one per call (the inline rewrite's view)."""
    return _search(gm)[0]


def _search(gm: fx.GraphModule) -> tuple[list[_Region], list[Rejected]]:
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
    dominance, routing_scopes = Dominance(graph), _routing_scopes(graph, gm)
    kept = []
    for region in regions:
        reason = _verify(region, gm, routing_scopes, dominance)
        if reason:
            rejected.append(Rejected(_path_of(region.down.node), reason))
        else:
            kept.append(region)
    return kept, rejected


# ── the walk back from a down projection ─────────────────────────────────────────────────────


@dataclass
class _Region:
    down: Linear
    up: Linear
    gate: Linear | None
    fused: bool
    gate_first: bool
    entry: fx.Node  # the input the projections read
    nodes: list[fx.Node]  # every node of the region but the entry, topologically ordered
    act_nodes: list[fx.Node]  # the activation's nodes (the gate branch, or the whole mid of a plain MLP)
    act_source: fx.Node  # what the activation reads (the gate or up projection's output, or its half)
    rowwise_mid: bool


def _walk(down: Linear, linears: dict, gm) -> _Region | Rejected | None:
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
        half = _half_of(node, linears)
        if half is not None:
            leaves.append((linears[half[0]], half[1], node))
            mid.append(node)
            if node.args[0] not in linears:  # the split op the half comes from
                mid.append(node.args[0])
            continue
        kind = _row_kind(node, gm)
        if kind is None:
            source = _attention_source(node, gm) if all(op_name(n, gm) in _LOOK_THROUGH for n in mid) else None
            if source is not None:
                return Rejected(_path_of(down.node), f"attention projection: its input comes from `{source}`, which mixes tokens")
            return None
        mid.append(node)
        frontier.extend(tensor_inputs(node))
    if not leaves:
        return None
    return _classify(down, leaves, mid, gm)


def _attention_source(node: fx.Node, gm) -> str | None:
    """The attention op ``node`` reads through views and permutes only, if any."""
    for _ in range(8):
        name = op_name(node, gm)
        if name in ATTENTION:
            return name
        inputs = tensor_inputs(node)
        if name not in _LOOK_THROUGH or len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _row_kind(node: fx.Node, gm) -> str | None:
    """How ``node`` acts on rows: "pointwise", "transparent", "layout", "rowwise"; None: it mixes rows."""
    name = op_name(node, gm)
    if node.op in ("placeholder", "output", "get_attr") or name is None:
        return None
    if name in TRANSPARENT:
        return "transparent"
    if is_pointwise(node, gm):
        return "pointwise"
    if name in LAYOUT:
        return "layout" if _keeps_last_axis(node) else None
    if name in ROW_OPS or (name in ROW_REDUCTIONS and _reduces_last_only(node)):
        return "rowwise"
    return None


def _keeps_last_axis(node: fx.Node) -> bool:
    before, after = shape_of(tensor_inputs(node)[0]), shape_of(node)
    return before is not None and after is not None and before[-1:] == after[-1:] and len(after) >= 1


def _is_last_axis(dim, source: fx.Node) -> bool:
    """Whether axis ``dim`` of ``source`` is its last one (-1 needs no shape)."""
    shape = shape_of(source)
    return dim == -1 or (isinstance(dim, int) and shape is not None and dim % len(shape) == len(shape) - 1)


def _reduces_last_only(node: fx.Node) -> bool:
    dims = arg(node, 1, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return len(dims) == 1 and bool(arg(node, 2, "keepdim", False)) and _is_last_axis(dims[0], tensor_inputs(node)[0])


def _half_of(node: fx.Node, linears: dict) -> tuple[fx.Node, int] | None:
    """``(fused linear, 0 or 1)`` when ``node`` is one half (last axis) of a linear's output."""
    name = op_name(node)
    if name == "getitem" and isinstance(node.args[0], fx.Node):
        split, index = node.args[0], node.args[1]
        if split.args and split.args[0] in linears and op_name(split) in _SPLITS and index in (0, 1):
            lin = linears[split.args[0]]
            if _split_in_halves(split, lin.out_features):
                return split.args[0], index
        if node.args[0] in linears:  # x[..., :h] / x[..., h:]
            return _halves_by_slice(node.args[0], index, linears[node.args[0]].out_features)
    if name == "slice" and node.args and node.args[0] in linears:
        lin = linears[node.args[0]]
        dim, start, end = arg(node, 1, "dim", 0), arg(node, 2, "start"), arg(node, 3, "end")
        h = lin.out_features // 2
        if _is_last_axis(dim, node.args[0]):
            if start in (0, None) and end == h:
                return node.args[0], 0
            if start == h and (end is None or end >= 2 * h):
                return node.args[0], 1
    return None


def _split_in_halves(split: fx.Node, out_features: int) -> bool:
    name, args = op_name(split), split.args
    if not _is_last_axis(arg(split, 2, "dim", 0), args[0]):
        return False
    size = args[1] if len(args) > 1 else split.kwargs.get("chunks", split.kwargs.get("split_size_or_sections"))
    if name == "chunk":
        return size == 2
    return size == out_features // 2 or (isinstance(size, (list, tuple)) and list(size) == [out_features // 2] * 2)


def _halves_by_slice(source: fx.Node, index, out_features: int) -> tuple[fx.Node, int] | None:
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)):
        return None
    s, h = index[1], out_features // 2
    if s.step not in (None, 1):
        return None
    if s.start in (None, 0) and s.stop == h:
        return source, 0
    if s.start == h and s.stop is None:
        return source, 1
    return None


def _classify(down: Linear, leaves: list, mid: list[fx.Node], gm) -> _Region | Rejected | None:
    where = _path_of(down.node)
    mid = sorted(set(mid))  # fx nodes compare by their position in the graph
    distinct = {(lin.node, half) for lin, half, _ in leaves}
    linears = {lin.node: lin for lin, _, _ in leaves}
    rowwise = any(_row_kind(n, gm) == "rowwise" for n in mid)
    if len(distinct) == 1 and next(iter(distinct))[1] is None:
        up = linears[next(iter(distinct))[0]]
        act = [n for n in mid if _row_kind(n, gm) != "layout"]
        if all(op_name(n, gm) in TRANSPARENT for n in act):
            return None  # two linears in a row (a low-rank factorisation), not an FFN: no activation between
        return _Region(down, up, None, False, True, up.input, [up.node, *mid, down.node], act, up.node, rowwise)
    if len(distinct) != 2:
        return Rejected(where, f"{len(distinct)} projections feed `{_short(down)}`: not up → act → down or a gated form")
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
    bad = [n for n in post if op_name(n, gm) not in TRANSPARENT and _row_kind(n, gm) != "layout"]
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
    return _Region(down, up, None if fused else gate, fused, gate_key[1] in (None, 0), entry, nodes, act, act_source, rowwise)


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


# ── verification ─────────────────────────────────────────────────────────────────────────────


def _routing_scopes(graph: fx.Graph, gm) -> dict[str, str]:
    """Module call keys that route tokens (the router and the layer around it) → their path."""
    scopes = {}
    for node in graph.nodes:
        name = op_name(node, gm)
        if name == "module:MoE":  # a moefx layer kept whole by symbolic_trace
            scopes[node.target] = f"{node.target} (MoE)"
        if name in ROUTING or name == "module:MoE":
            scopes.update((key, f"{path} ({cls})") for key, path, cls in module_scope(node)[-2:] if path)
    return scopes


def _verify(region: _Region, gm, routing_scopes: dict, dominance: Dominance) -> str | None:
    for node in region.nodes:
        for key, _, _ in module_scope(node):
            if key in routing_scopes:
                return f"inside `{routing_scopes[key]}`, which already routes tokens to experts (an existing MoE layer)"
    projections = [region.up, region.down] + ([region.gate] if region.gate else [])
    for lin in projections:
        if lin.weight is None:
            return f"the weight of `{_short(lin)}` is not a parameter (computed at run time, or a buffer)"
        if not lin.bias_is_param:
            return f"the bias of `{_short(lin)}` is not a parameter"
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
    if axis is not None and axis != -1 and not region.up.channels_first:  # a 1x1 convolution's axis is 1
        return (
            f"token-mixing MLP: its input's last axis is not the feature axis (features are on axis {axis}), "
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


# ── grouping calls, naming, placement ────────────────────────────────────────────────────────


def _group(regions: list[_Region], gm) -> tuple[list[FFNMatch], list[Rejected]]:
    groups: dict[tuple, list[_Region]] = defaultdict(list)
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


def _match(r: _Region, calls: int, placement: Placement, gm) -> FFNMatch:
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


def _name(r: _Region, gm) -> str:
    nodes = [n for n in r.act_nodes if op_name(n, gm) not in TRANSPARENT]
    if not nodes:
        return "identity"
    try:
        fn = activations.extract(gm, nodes, r.act_source, skip=lambda n: op_name(n, gm) in TRANSPARENT)
    except Exception:  # noqa: BLE001  (an unnameable chain is still an elementwise activation)
        return "elementwise"
    return activations.identify(fn)


def _path_of(node: fx.Node) -> str:
    scope = module_scope(node)
    return scope[-1][1] if scope else node.name


def _short(lin: Linear) -> str:
    return (lin.weight or lin.node.name).removesuffix(".weight")


def _dedupe(rejected: list[Rejected]) -> list[Rejected]:
    seen, out = set(), []
    for r in rejected:
        if (r.path, r.reason) not in seen:
            seen.add((r.path, r.reason))
            out.append(r)
    return out


