"""``moefx::grouped_linear``: one linear layer per expert over that expert's rows.

Legend: S rows (permuted slots), I in features, O out features, E experts.

    y_SO[r] = x_SI[r] @ weight_EOI[e].T + bias_EO[e]    for offsets[e] <= r < offsets[e+1]
    y_SO[r] = 0                                         for r >= offsets[E] (dropped rows)

Weights are ``[E, out, in]``, the layout of a stack of ``nn.Linear`` weights, so an FFN's linear
copies straight into every expert. ``offsets_E1`` is int64 ``[E+1]`` starting at 0 (from
``moefx::permute``).

CPU implementation: one GEMM per non-empty expert segment, written into slices of the output.
``torch.nn.functional.grouped_mm`` on CPU runs the same per-group loop (measured equal time at
the benchmark shapes, torch 2.13) but rejects strides that are not 16-byte aligned and its
backward fails when an expert receives zero tokens, so the loop is both as fast and total here.
Device kernels register for their dispatch key next to this default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.kernels.ops.dtypes import at_least_fp32
from moefx.kernels.ops.segments import check_grouped_weights, expert_segments, weight_grad_buffer

OP = "moefx::grouped_linear"


@torch.library.custom_op("moefx::grouped_linear", mutates_args=())
def grouped_linear(x_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor) -> Tensor:
    check_grouped_weights(OP, x_SI, weight_EOI, bias_EO, offsets_E1)
    segments, kept = expert_segments(OP, offsets_E1, x_SI.shape[0])
    y_SO = x_SI.new_empty((x_SI.shape[0], weight_EOI.shape[1]))
    y_SO[kept:].zero_()
    for e, a, b in segments:
        if bias_EO is None:
            torch.mm(x_SI[a:b], weight_EOI[e].t(), out=y_SO[a:b])
        else:
            torch.addmm(bias_EO[e], x_SI[a:b], weight_EOI[e].t(), out=y_SO[a:b])
    return y_SO


@grouped_linear.register_fake
def _(x_SI, weight_EOI, bias_EO, offsets_E1):
    check_grouped_weights(OP, x_SI, weight_EOI, bias_EO, offsets_E1)
    return x_SI.new_empty((x_SI.shape[0], weight_EOI.shape[1]))


@torch.library.custom_op("moefx::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(
    grad_y_SO: Tensor, x_SI: Tensor, weight_EOI: Tensor, offsets_E1: Tensor, need_x: bool, need_weight: bool, need_bias: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_x_SI, grad_weight_EOI, grad_bias_EO)``; a gradient not needed is an empty tensor."""
    segments, kept = expert_segments(OP, offsets_E1, x_SI.shape[0])
    # Only what no segment writes is zeroed: dropped rows, and experts that got no rows.
    grad_x_SI = torch.empty_like(x_SI) if need_x else x_SI.new_empty(0)
    grad_x_SI[kept:].zero_()
    grad_weight_EOI = weight_grad_buffer(weight_EOI, segments) if need_weight else weight_EOI.new_empty(0)
    grad_bias_EO = weight_EOI.new_zeros(weight_EOI.shape[:2]) if need_bias else weight_EOI.new_empty(0)
    for e, a, b in segments:
        g = grad_y_SO[a:b]
        if need_x:
            torch.mm(g, weight_EOI[e], out=grad_x_SI[a:b])
        if need_weight:
            torch.mm(g.t(), x_SI[a:b], out=grad_weight_EOI[e])
        if need_bias:
            grad_bias_EO[e] = g.sum(0, dtype=at_least_fp32(g.dtype))
    return grad_x_SI, grad_weight_EOI, grad_bias_EO


@grouped_linear_backward.register_fake
def _(grad_y_SO, x_SI, weight_EOI, offsets_E1, need_x, need_weight, need_bias):
    return (
        torch.empty_like(x_SI) if need_x else x_SI.new_empty(0),
        torch.empty_like(weight_EOI) if need_weight else weight_EOI.new_empty(0),
        weight_EOI.new_empty(weight_EOI.shape[:2]) if need_bias else weight_EOI.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x_SI, weight_EOI, bias_EO, offsets_E1 = inputs
    ctx.save_for_backward(x_SI, weight_EOI, offsets_E1)
    ctx.has_bias = bias_EO is not None


def _backward(ctx, grad_y_SO):
    x_SI, weight_EOI, offsets_E1 = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_x, grad_weight, grad_bias = grouped_linear_backward(
        grad_y_SO.contiguous(), x_SI, weight_EOI, offsets_E1, need_x, need_weight, need_bias and ctx.has_bias
    )
    return (
        grad_x if need_x else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias and ctx.has_bias else None,
        None,
    )


grouped_linear.register_autograd(_backward, setup_context=_setup_context)
