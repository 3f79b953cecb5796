"""canonicalize: every form of linear to ``normal_form.linear``; assertion nodes dropped.

    before                                         after
    %t   = aten.t(%w)                              %y = normal_form.linear(%x, %w, bias=%b)
    %mm  = aten.matmul(%x, %t)
    %y   = aten.add(%mm, %b)

    %v   = aten.view(%x, [-1, 768])                %y = normal_form.linear(%x, %W, bias=%b,
    %a   = aten.addmm(%b, %v, %W)   (Conv1D)                                 transposed=True)
    %y   = aten.view(%a, [2, 8, 3072])

    call_module[fc1] (nn.Linear)                   %y = normal_form.linear(%x, %fc1.weight, bias=%fc1.bias)

Forms: ``linear``/``F.linear``, ``addmm`` (with the views around it when the shapes show they
only flatten the leading dims), ``mm``/``matmul`` (+ ``add`` of a 1-D bias), an ``einsum`` that
contracts the input's last axis with a 2-D parameter (``"bsd,dh->bsh"``), ``nn.Linear`` modules,
with the weight as stored (``[out, in]``) or transposed (``[in, out]``, or read through
``t``/``transpose``/``permute``); and a pointwise (1x1, stride 1, one group) convolution, a
linear over axis 1 of its channels-first input (``channels_first=True``). Activations and no-ops
stay as they are: ``ops`` classifies them (pointwise ops are one class; dropout, identity and
casts are transparent), and ``find_ffn`` names an activation (``moefx.layer.activations``) when a
match needs it. The graph still computes what the model computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from torch import fx, nn

from moefx.passes.graph import normal_form
from moefx.passes.graph.ops import ASSERTIONS, CONVOLUTIONS, arg, op_name, remove_dead_code, shape_of


@dataclass(frozen=True)
class Canonicalized:
    linears: int  # normal-form linears in the graph after the pass
    rewritten: int  # nodes that were rewritten into that form
    erased: int  # assertion nodes removed


def canonicalize(gm: fx.GraphModule) -> Canonicalized:
    graph = gm.graph
    erased = rewritten = 0
    for node in list(graph.nodes):
        name = op_name(node, gm)
        if (name in ASSERTIONS or (node.op == "call_module" and node.target == "_guards_fn")) and not node.users:
            graph.erase_node(node)
            erased += 1
        elif name == "linear" and node.op == "call_module":
            rewritten += _from_module(gm, node)
        elif name in CONVOLUTIONS and "transpose" not in name:
            rewritten += _from_pointwise_conv(gm, node)
        elif name == "linear" and not normal_form.is_linear(node):
            rewritten += _from_linear(node)
        elif name == "addmm":
            rewritten += _from_addmm(gm, node)
        elif name in ("mm", "matmul"):
            rewritten += _from_matmul(gm, node)
        elif name == "einsum":
            rewritten += _from_einsum(node)
    if rewritten or erased:
        remove_dead_code(graph)
        graph.lint()
        gm.recompile()
    linears = sum(normal_form.is_linear(n) for n in graph.nodes)
    return Canonicalized(linears=linears, rewritten=rewritten, erased=erased)


def _replace(old: fx.Node, x, weight, bias, transposed: bool, last: fx.Node, channels_first: bool = False) -> int:
    """Insert the normal form before ``old`` and send ``last``'s users to it."""
    kwargs = {"bias": bias, "transposed": transposed}
    if channels_first:
        kwargs["channels_first"] = True
    with old.graph.inserting_before(old):
        new = old.graph.call_function(normal_form.linear, (x, weight), kwargs)
    new.meta = dict(last.meta)
    new.meta["nn_module_stack"] = old.meta.get("nn_module_stack", last.meta.get("nn_module_stack"))
    last.replace_all_uses_with(new)
    return 1


def _from_module(gm: fx.GraphModule, node: fx.Node, channels_first: bool = False) -> int:
    """An ``nn.Linear`` (or 1x1 ``nn.Conv*d``) call: its parameters read by get_attr, in the normal form."""
    module: nn.Linear | nn.Conv2d = gm.get_submodule(node.target)
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
        bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    for n in (weight, bias):
        if n is not None:
            n.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
    _replace(node, node.args[0], weight, bias, False, node, channels_first=channels_first)
    graph.erase_node(node)
    return 1


def _from_pointwise_conv(gm: fx.GraphModule, node: fx.Node) -> int:
    """A 1x1 convolution (stride 1, no padding, one group) is a linear over axis 1; others stay."""
    if node.op == "call_module":
        conv = gm.get_submodule(node.target)
        pointwise = _is_pointwise_conv(conv.weight.shape, conv.stride, conv.padding, conv.groups)
        if conv.padding_mode != "zeros" or not pointwise:
            return 0
        return _from_module(gm, node, channels_first=True)
    weight, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return 0
    if op_name(node) == "convolution":  # aten: (x, w, b, stride, padding, dilation, transposed, output_padding, groups)
        if arg(node, 6, "transposed", False):
            return 0
        stride, padding, groups = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 8, "groups", 1)
    else:
        stride, padding, groups = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 6, "groups", 1)
    if not _is_pointwise_conv(attrgetter(weight.target)(gm).shape, stride, padding, groups):
        return 0
    return _replace(node, node.args[0], weight, bias, False, node, channels_first=True)


def _is_pointwise_conv(weight_shape, stride, padding, groups) -> bool:
    def ints(v):
        return [v] if isinstance(v, int) else list(v)

    return (
        len(weight_shape) >= 3 and all(k == 1 for k in weight_shape[2:]) and groups == 1
        and all(s == 1 for s in ints(stride)) and (padding in ("valid", "same") or all(p == 0 for p in ints(padding)))
    )


def _from_linear(node: fx.Node) -> int:
    weight, transposed = arg(node, 1, "weight"), False
    source = _weight_source(weight)
    if source is not None:  # F.linear(x, W.t()): W is stored [in, out]
        weight, transposed = source[0], not source[1]
    return _replace(node, node.args[0], weight, arg(node, 2, "bias"), transposed, node)


def _weight_source(node) -> tuple[fx.Node, bool] | None:
    """The get_attr a matmul's right operand reads, and whether it is stored ``[in, out]``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node, True
    name = op_name(node)
    src = node.args[0] if node.args else None
    if not (isinstance(src, fx.Node) and src.op == "get_attr"):
        return None
    if name in ("t", "mT", "numpy_T") or (name == "transpose" and sorted(_dims(node.args[1:3])) in ([0, 1], [-2, -1])):
        return src, False
    if name == "permute" and list(_dims(node.args[1] if len(node.args) == 2 else node.args[1:])) == [1, 0]:
        return src, False
    return None


def _dims(values):
    return [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])]


def _bias_user(node: fx.Node, out_features: int | None, gm) -> tuple[fx.Node, fx.Node] | None:
    """``(add node, bias get_attr)`` when ``node``'s only user adds a 1-D bias to it."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if op_name(user) != "add" or len(user.args) != 2 or user.kwargs.get("alpha", 1) != 1:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    if not (isinstance(other, fx.Node) and other.op == "get_attr"):
        return None
    shape = tuple(attrgetter(other.target)(gm).shape)
    if len(shape) != 1 or (out_features is not None and shape[0] != out_features):
        return None
    return user, other


def _from_matmul(gm: fx.GraphModule, node: fx.Node) -> int:
    if len(node.args) != 2:
        return 0
    source = _weight_source(node.args[1])
    if source is None:
        return 0
    weight, transposed = source
    shape = tuple(attrgetter(weight.target)(gm).shape)
    if len(shape) != 2:
        return 0
    out_features = shape[1] if transposed else shape[0]
    bias = _bias_user(node, out_features, gm)
    last = bias[0] if bias else node
    _replace(node, node.args[0], weight, bias[1] if bias else None, transposed, last)
    return 1


def _from_addmm(gm: fx.GraphModule, node: fx.Node) -> int:
    if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
        return 0
    bias, x2d, mat2 = node.args[:3]
    source = _weight_source(mat2)
    if source is None or not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return 0
    weight, transposed = source
    x, last = x2d, node
    # Conv1D flattens the leading dims around addmm: absorb both views when the shapes show it.
    if op_name(x2d) in ("view", "reshape") and len(node.users) == 1:
        unflatten = next(iter(node.users))
        outer_in, inner_out = shape_of(x2d.args[0]), shape_of(unflatten)
        if (
            op_name(unflatten) in ("view", "reshape") and outer_in is not None and inner_out is not None
            and outer_in[:-1] == inner_out[:-1]
        ):
            x, last = x2d.args[0], unflatten
    _replace(node, x, weight, bias, transposed, last)
    return 1


def _from_einsum(node: fx.Node) -> int:
    """``einsum("...d,dh->...h", x, W)`` (or ``hd``): the input's last axis against a 2-D parameter."""
    equation, operands = node.args[0], node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if not isinstance(equation, str) or len(operands) != 2 or node.kwargs:
        return 0
    x, w = operands
    source, layout = _weight_source(w), _einsum_weight_layout(equation.replace(" ", ""))
    if source is None or layout is None:
        return 0
    weight, read_as_stored = source  # read through W.t(): the layout flips
    return _replace(node, x, weight, None, layout == read_as_stored, node)


def _einsum_weight_layout(equation: str) -> bool | None:
    """For ``"<x>,<w>-><out>"``: True when w is ``[in, out]``, False when ``[out, in]``, None when not a linear."""
    if "->" not in equation or equation.count(",") != 1:
        return None
    inputs, out = equation.split("->")
    x, w = inputs.split(",")
    x_axes, out_axes = x.replace("...", "."), out.replace("...", ".")
    if len(w) != 2 or "." in w or not x_axes or not out_axes or len(set(x_axes)) != len(x_axes):
        return None
    contracted = x_axes[-1]
    if contracted not in w or w[0] == w[1] or contracted in out_axes:
        return None
    produced = w[1] if w[0] == contracted else w[0]
    if out_axes != x_axes[:-1] + produced or produced in x_axes:
        return None
    return w[0] == contracted
