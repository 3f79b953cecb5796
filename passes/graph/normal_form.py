"""The normal form canonicalize rewrites every linear into, and how passes read it back.

    normal_form.linear(x, weight, bias=None, transposed=False, channels_first=False)

``weight`` is ``[out, in]`` like ``nn.Linear``'s, or ``[in, out]`` with ``transposed=True``
(GPT-2's ``Conv1D``, ``x @ W``). ``channels_first``: a pointwise (1x1) convolution, whose weight
is ``[out, in, 1, ...]`` and whose features are axis 1 of ``x`` (``N, C, ...``), not the last.
The function runs, so a canonicalized graph still computes what the model computes (the tests
check that).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import torch.nn.functional as F
from torch import Tensor, fx


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, transposed: bool = False, channels_first: bool = False,
) -> Tensor:
    if channels_first:
        return F.linear(x.movedim(1, -1), weight.flatten(1), bias).movedim(-1, 1)
    return F.linear(x, weight.t() if transposed else weight, bias)


linear._moefx_op = "moefx.linear"  # the name ops.op_name gives it


@dataclass(frozen=True)
class Linear:
    """A normal-form linear node, read back: its input, parameter names and sizes."""

    node: fx.Node
    input: fx.Node
    weight: str | None  # parameter name, or None when the weight is computed or a buffer
    bias: str | None
    bias_is_param: bool
    transposed: bool
    channels_first: bool
    in_features: int
    out_features: int

    @property
    def label(self) -> str:
        """How messages name it: its module path (``mlp.up``), else its node."""
        return (self.weight or self.node.name).removesuffix(".weight")


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is linear


def read_linear(node: fx.Node, root) -> Linear:
    """``node`` (a normal-form linear) read back against ``root``, the module the graph belongs to."""
    weight_node = node.args[1]
    bias_node = node.kwargs.get("bias")
    transposed = node.kwargs.get("transposed", False)
    channels_first = node.kwargs.get("channels_first", False)
    weight_name = _parameter_name(weight_node, root)
    shape = _tensor_shape(weight_node, root)
    if channels_first and shape is not None:
        shape = shape[:2]  # [out, in, 1, ...]
    out_f, in_f = (shape[::-1] if transposed else shape) if shape is not None and len(shape) == 2 else (-1, -1)
    bias_name = _parameter_name(bias_node, root) if bias_node is not None else None
    return Linear(
        node=node, input=node.args[0], weight=weight_name, bias=bias_name,
        bias_is_param=bias_node is None or bias_name is not None, transposed=transposed, channels_first=channels_first,
        in_features=in_f, out_features=out_f,
    )


def _parameter_name(node, root) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        root.get_parameter(node.target)
    except AttributeError:
        return None
    return node.target


def _tensor_shape(node, root) -> tuple[int, ...] | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            return tuple(attrgetter(node.target)(root).shape)
        except AttributeError:
            return None
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if val is not None and hasattr(val, "shape") else None
