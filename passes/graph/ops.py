"""The op vocabulary the passes share, over both graph dialects moefx captures.

``torch.export`` gives ATen nodes (``aten.gelu.default``); ``torch.fx.symbolic_trace`` gives
torch-level nodes (``F.gelu``, ``operator.mul``, ``x.view(...)``, ``call_module`` for ``nn``
leaves). ``op_name`` maps both to one name (``"gelu"``, ``"mul"``, ``"view"``), and the
predicates below classify nodes by that name, so no pass needs to know which dialect it reads.
"""

from __future__ import annotations

import operator
from functools import cache

import torch
from torch import fx, nn

# Ops that change neither values nor the row layout (in eval; dropout is the identity there and
# a per-element mask in training, which keeps rows independent).
TRANSPARENT = frozenset({
    "dropout", "feature_dropout", "alpha_dropout", "native_dropout", "identity", "alias", "clone", "contiguous",
    "detach", "to", "_to_copy", "type", "type_as", "float", "half", "bfloat16", "double", "lift_fresh_copy",
})
# Casts among TRANSPARENT: they change the dtype, which the MoE layer's own dtype takes care of.
CASTS = frozenset({"to", "_to_copy", "type", "type_as", "float", "half", "bfloat16", "double"})
# Ops that only reshape (rows are kept if the last dimension is).
LAYOUT = frozenset({"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "expand"})
# Ops that move axes.
PERMUTES = frozenset({"transpose", "permute", "t", "movedim", "swapaxes", "mT"})
# Reductions that are row-wise when they reduce the last dimension only (norms written by hand).
ROW_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp"})
# Row-wise ops over the last dimension with a module of their own (norms, softmax).
ROW_OPS = frozenset({"layer_norm", "rms_norm", "softmax", "_softmax", "log_softmax"})
# Convolutions, by their export (ATen) and symbolic_trace names; their features are axis 1.
CONVOLUTIONS = frozenset({
    "convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
})
# Ops that mix tokens: what an attention block's output projection reads from.
ATTENTION = frozenset({
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "bmm", "baddbmm", "einsum",
})
# Ops that decide a route: their presence marks an existing Mixture-of-Experts layer.
ROUTING = frozenset({"topk", "moefx.route"})
# Assertions export inserts; they use tensors but compute nothing.
ASSERTIONS = frozenset({"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async"})

_OPERATOR_NAMES = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.mul: "mul", operator.imul: "mul",
    operator.truediv: "div", operator.neg: "neg", operator.pow: "pow", operator.matmul: "matmul",
    operator.getitem: "getitem",
}
# torch.nn leaf modules that symbolic_trace keeps as call_module, by the op they compute.
_MODULE_OPS = {
    nn.Linear: "linear", nn.Dropout: "dropout", nn.Identity: "identity", nn.LayerNorm: "layer_norm",
    nn.Softmax: "softmax", nn.Conv1d: "convolution", nn.Conv2d: "convolution", nn.Conv3d: "convolution",
    nn.Embedding: "embedding", nn.MultiheadAttention: "scaled_dot_product_attention",
}
# torch.nn activation modules (symbolic_trace keeps them as call_module): pointwise.
_ACTIVATION_MODULES = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.LeakyReLU, nn.Mish, nn.Softplus,
    nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.SELU, nn.CELU, nn.Tanhshrink,
)
_ALIASES = {"truediv": "div", "true_divide": "div", "multiply": "mul", "subtract": "sub", "_softmax": "softmax"}


def op_name(node: fx.Node, root: nn.Module | None = None) -> str | None:
    """One name for what ``node`` computes, whichever dialect; None for placeholders and outputs."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            name = target.overloadpacket.__name__
            if target.namespace == "moefx":
                return f"moefx.{name}"
        elif target in _OPERATOR_NAMES:
            name = _OPERATOR_NAMES[target]
        else:
            name = getattr(target, "_moefx_op", None) or getattr(target, "__name__", str(target))
        return _ALIASES.get(name, name)
    if node.op == "call_method":
        return _ALIASES.get(node.target, node.target)
    if node.op == "call_module" and root is not None:
        module = root.get_submodule(node.target)
        for cls, name in _MODULE_OPS.items():
            if isinstance(module, cls):
                return name
        if isinstance(module, _ACTIVATION_MODULES):
            return "activation_module"
        return f"module:{type(module).__name__}"
    return None


@cache
def is_pointwise_name(name: str) -> bool:
    """Whether the ATen op of this name is tagged pointwise (an elementwise function)."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return False
    try:
        return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())
    except (AttributeError, RuntimeError):
        return False


def is_pointwise(node: fx.Node, root: nn.Module | None = None) -> bool:
    name = op_name(node, root)
    return name == "activation_module" or (name is not None and is_pointwise_name(name))


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes ``node`` reads that carry values: parameters and buffers read by get_attr are
    excluded, and so are symbolic_trace's reads of a tensor's metadata (``x.to(y.dtype)``)."""
    return [n for n in node.all_input_nodes if n.op != "get_attr" and not is_metadata_read(n)]


# What symbolic_trace records for ``y.dtype``, ``y.shape``, ``y.size(0)``, ``y.dim()``: facts about a
# tensor, not values computed from it.
_METADATA_ATTRIBUTES = frozenset({"dtype", "device", "shape", "ndim", "layout", "is_cuda"})
_METADATA_METHODS = frozenset({"size", "dim"})


def is_metadata_read(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _METADATA_ATTRIBUTES
    return node.op == "call_method" and node.target in _METADATA_METHODS


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The static shape captured for ``node`` (export records it; symbolic_trace does not)."""
    val = node.meta.get("val")
    if val is None:
        tm = node.meta.get("tensor_meta")
        shape = getattr(tm, "shape", None)
    else:
        shape = getattr(val, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``name`` of ``node``, given by keyword or at position ``index``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def module_scope(node: fx.Node) -> list[tuple[str, str, str]]:
    """``(call key, module path, class name)`` from the root to the innermost module call."""
    stack = node.meta.get("nn_module_stack") or {}
    scope = []
    for key, (path, cls) in stack.items():
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        scope.append((key, path, name.rsplit(".", 1)[-1]))
    return scope


def remove_dead_code(graph: fx.Graph) -> None:
    """``graph.eliminate_dead_code()`` that keeps fx's guards on fixed arguments (``concrete_args``):
    ``_assert_is_none`` has no users and is not marked impure, and without it a call with another
    value would silently run the fixed-value graph."""
    guard = torch.fx._symbolic_trace._assert_is_none
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or node.target is guard)


def detached_copy(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` that no GraphModule owns (pickling a graph pickles its owner, and a
    GraphModule built on a graph takes it as its own)."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy
