"""How an op acts on the rows of its input (a row: the features of one token, the last axis).

    row_kind(node)     "pointwise" (gelu, mul), "transparent" (dropout, casts), "layout" (a view that
                       keeps the last axis), "rowwise" (a norm over the last axis), or None: it mixes rows
    half_of(node)      (fused linear, 0 or 1) for g, u = proj(x).chunk(2, -1), split, x[..., :h], slice
    attention_source   the attention op a value comes from through views and permutes only

``find_ffn`` walks back from a down projection through the ops these accept.
"""

from __future__ import annotations

from torch import fx

from moefx.passes.graph.ops import (
    ATTENTION,
    LAYOUT,
    PERMUTES,
    ROW_OPS,
    ROW_REDUCTIONS,
    TRANSPARENT,
    arg,
    is_pointwise,
    op_name,
    shape_of,
    tensor_inputs,
)

LOOK_THROUGH = LAYOUT | PERMUTES | TRANSPARENT  # ops that move values without computing: views, permutes, no-ops
_SPLITS = frozenset({"chunk", "split", "split_with_sizes", "tensor_split", "unsafe_split"})


def attention_source(node: fx.Node, gm) -> str | None:
    """The attention op ``node`` reads through views and permutes only, if any."""
    for _ in range(8):
        name = op_name(node, gm)
        if name in ATTENTION:
            return name
        inputs = tensor_inputs(node)
        if name not in LOOK_THROUGH or len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def row_kind(node: fx.Node, gm) -> str | None:
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


def half_of(node: fx.Node, linears: dict) -> tuple[fx.Node, int] | None:
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
