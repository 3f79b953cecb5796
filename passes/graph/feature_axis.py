"""Which axis of a tensor holds features: the test that tells a channel MLP from a token-mixing one.

An MoE routes rows over the feature axis. ``x @ W`` is an FFN over features only when the last
axis of ``x`` is the feature axis: MLP-Mixer's token-mixing MLP transposes so that the *sequence*
axis is last, while ConvNeXt permutes NCHW to NHWC so that the channels are. The axis is followed
forward from where it is known (linear, norm and embedding outputs: last; convolutions, and
linears over channels-first input (1x1 convolutions): 1) through pointwise ops, permutes and
views. Axes are negative (-1 is last); None means unknown, which a caller treats as "last" (the
PyTorch convention for model inputs). Where a model input of up to 3 dimensions is permuted, the
convention is applied before the permute, so ``x.transpose(1, 2)`` of a ``[batch, sequence,
features]`` input puts the sequence last (token mixing); a 4-D input may be an image with
channels first, and an input that is not permuted keeps its axis unknown (a 1x1 ``Conv1d`` FFN may
read ``[batch, channels, length]`` directly).
"""

from __future__ import annotations

from math import prod

from torch import fx

from moefx.passes.graph import normal_form
from moefx.passes.graph.ops import (
    CONVOLUTIONS,
    LAYOUT,
    PERMUTES,
    ROW_OPS,
    TRANSPARENT,
    arg,
    is_pointwise,
    op_name,
    shape_of,
    tensor_inputs,
)

_LAST_AXIS_PRODUCERS = frozenset({"embedding", "layer_norm", "rms_norm", "softmax", "scaled_dot_product_attention"})
_DEPTH = 64


def feature_axis(node: fx.Node, root=None, _depth: int = 0, _inputs_last: bool = False) -> int | None:
    if _depth > _DEPTH or not isinstance(node, fx.Node):
        return None
    channels_first = normal_form.is_linear(node) and node.kwargs.get("channels_first", False)
    if normal_form.is_linear(node) and not channels_first:
        return -1
    name = op_name(node, root)
    if name in _LAST_AXIS_PRODUCERS or name in ROW_OPS:
        return -1
    if name in CONVOLUTIONS or channels_first:  # a 1x1 convolution, in the normal form
        ndim = _ndim(node)
        return None if ndim is None else 1 - ndim
    if node.op == "placeholder" and _inputs_last:  # only where the input is permuted (see the module's doc)
        ndim = _ndim(node)
        return -1 if ndim is not None and ndim <= 3 else None
    inputs = tensor_inputs(node)
    if not inputs:
        return None
    source = feature_axis(inputs[0], root, _depth + 1, _inputs_last)
    if source is None and name in PERMUTES and not _inputs_last:
        source = feature_axis(inputs[0], root, _depth + 1, _inputs_last=True)
    if name in TRANSPARENT or is_pointwise(node, root) or name in ("batch_norm", "_native_batch_norm_legit_no_training"):
        return source
    if source is None:
        return None
    if name in PERMUTES:
        return _through_permute(node, name, source)
    if name in LAYOUT:
        return _through_view(inputs[0], node, source)
    return None


def _ndim(node: fx.Node) -> int | None:
    shape = shape_of(node)
    return None if shape is None else len(shape)


def _through_permute(node: fx.Node, name: str, axis: int) -> int | None:
    ndim = _ndim(node)
    if name == "t":
        ndim = ndim or 2
    if ndim is None:
        if name in ("transpose", "swapaxes", "mT"):
            d0, d1 = (-2, -1) if name == "mT" else (arg(node, 1, "dim0"), arg(node, 2, "dim1"))
            if isinstance(d0, int) and isinstance(d1, int) and d0 < 0 and d1 < 0:
                return d1 if axis == d0 else d0 if axis == d1 else axis
        return None
    axis %= ndim
    if name in ("transpose", "swapaxes", "t", "mT"):
        if name in ("t", "mT"):
            d0, d1 = (0, 1) if name == "t" else (ndim - 2, ndim - 1)
        else:
            d0, d1 = arg(node, 1, "dim0") % ndim, arg(node, 2, "dim1") % ndim
        new = d1 if axis == d0 else d0 if axis == d1 else axis
    elif name == "movedim":
        source, destination = arg(node, 1, "source"), arg(node, 2, "destination")
        if not (isinstance(source, int) and isinstance(destination, int)):
            return None
        order = [d for d in range(ndim) if d != source % ndim]
        order.insert(destination % ndim, source % ndim)
        new = order.index(axis)
    elif name == "permute":
        dims = arg(node, 1, "dims")
        dims = list(dims) if isinstance(dims, (list, tuple)) else list(node.args[1:])
        new = [d % ndim for d in dims].index(axis)
    else:
        return None
    return new - ndim


def _through_view(src: fx.Node, node: fx.Node, axis: int) -> int | None:
    """The axis survives a view when it is a whole axis on both sides, at the same offset."""
    before, after = shape_of(src), shape_of(node)
    if before is None or after is None:
        return None
    axis %= len(before)
    offset, size = prod(before[:axis]), before[axis]
    for j in range(len(after)):
        if prod(after[:j]) == offset and after[j] == size and prod(after[j + 1:]) == prod(before[axis + 1:]):
            return j - len(after)
    return None
