"""``moefx::gather_grouped_linear``: a grouped linear that reads its rows straight from token order.

Legend: T tokens, S rows (permuted slots), I in features, O out features, E experts.

    y_SO[r] = x_TI[row_token_S[r]] @ weight_EOI[e].T + bias_EO[e]    for offsets[e] <= r < offsets[e+1]
    y_SO[r] = 0                                                      for r >= offsets[E] (dropped rows)

It equals ``moefx::permute`` followed by ``moefx::grouped_linear`` (``row_token_S`` is
``row_slot_S // K``), without the permuted ``[S, I]`` copy of the input: each expert gathers its
rows into a scratch buffer that stays in cache, and the buffer is reused by the next expert
(ScatterMoE fuses the gather into the GEMM's loads the same way). At top-8 that copy is eight
times the input; writing it and reading it back cost more than the gather itself on CPU.

Backward: dX sums each row's gradient back into its token (``index_add_``, expert by expert:
deterministic, and a token appears at most once per expert); dW gathers the input again instead
of keeping a permuted copy alive until the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.kernels.dtypes import at_least_fp32
from moefx.kernels.segments import check_grouped_weights, expert_segments, largest_segment

OP = "moefx::gather_grouped_linear"


def _check(x_TI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor, row_token_S: Tensor) -> None:
    check_grouped_weights(OP, x_TI, weight_EOI, bias_EO, offsets_E1)
    if row_token_S.dim() != 1 or row_token_S.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{OP}: row_token must be a 1-D integer tensor (the token of each row), "
            f"got {row_token_S.dtype} of shape {tuple(row_token_S.shape)}"
        )


@torch.library.custom_op(OP, mutates_args=())
def gather_grouped_linear(
    x_TI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor, row_token_S: Tensor
) -> Tensor:
    _check(x_TI, weight_EOI, bias_EO, offsets_E1, row_token_S)
    S = row_token_S.shape[0]
    segments, kept = expert_segments(OP, offsets_E1, S)
    y_SO = x_TI.new_empty((S, weight_EOI.shape[1]))
    y_SO[kept:].zero_()
    scratch = x_TI.new_empty((largest_segment(segments), x_TI.shape[1]))
    for e, a, b in segments:
        x_e = torch.index_select(x_TI, 0, row_token_S[a:b], out=scratch[: b - a])
        if bias_EO is None:
            torch.mm(x_e, weight_EOI[e].t(), out=y_SO[a:b])
        else:
            torch.addmm(bias_EO[e], x_e, weight_EOI[e].t(), out=y_SO[a:b])
    return y_SO


@gather_grouped_linear.register_fake
def _(x_TI, weight_EOI, bias_EO, offsets_E1, row_token_S):
    _check(x_TI, weight_EOI, bias_EO, offsets_E1, row_token_S)
    return x_TI.new_empty((row_token_S.shape[0], weight_EOI.shape[1]))


@torch.library.custom_op("moefx::gather_grouped_linear_backward", mutates_args=())
def gather_grouped_linear_backward(
    grad_y_SO: Tensor, x_TI: Tensor, weight_EOI: Tensor, offsets_E1: Tensor, row_token_S: Tensor,
    need_x: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_x_TI, grad_weight_EOI, grad_bias_EO)``; a gradient not needed is an empty tensor."""
    segments, _ = expert_segments(OP, offsets_E1, row_token_S.shape[0])
    acc_dtype = at_least_fp32(x_TI.dtype)
    grad_x_TI = x_TI.new_zeros(x_TI.shape, dtype=acc_dtype) if need_x else x_TI.new_empty(0)
    grad_weight_EOI = weight_EOI.new_empty(0)
    if need_weight:  # experts without rows get zeros; the others are overwritten
        grad_weight_EOI = weight_EOI.new_zeros(weight_EOI.shape) if len(segments) < weight_EOI.shape[0] else torch.empty_like(weight_EOI)
    grad_bias_EO = weight_EOI.new_zeros(weight_EOI.shape[:2]) if need_bias else weight_EOI.new_empty(0)
    scratch = x_TI.new_empty((largest_segment(segments), x_TI.shape[1]))
    for e, a, b in segments:
        g, tokens = grad_y_SO[a:b], row_token_S[a:b]
        if need_x:
            grad_x_TI.index_add_(0, tokens, torch.mm(g, weight_EOI[e]).to(acc_dtype))
        if need_weight:
            x_e = torch.index_select(x_TI, 0, tokens, out=scratch[: b - a])
            torch.mm(g.t(), x_e, out=grad_weight_EOI[e])
        if need_bias:
            grad_bias_EO[e] = g.sum(0, dtype=at_least_fp32(g.dtype))
    return grad_x_TI.to(x_TI.dtype), grad_weight_EOI, grad_bias_EO


@gather_grouped_linear_backward.register_fake
def _(grad_y_SO, x_TI, weight_EOI, offsets_E1, row_token_S, need_x, need_weight, need_bias):
    return (
        torch.empty_like(x_TI) if need_x else x_TI.new_empty(0),
        torch.empty_like(weight_EOI) if need_weight else weight_EOI.new_empty(0),
        weight_EOI.new_empty(weight_EOI.shape[:2]) if need_bias else weight_EOI.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x_TI, weight_EOI, bias_EO, offsets_E1, row_token_S = inputs
    ctx.save_for_backward(x_TI, weight_EOI, offsets_E1, row_token_S)
    ctx.has_bias = bias_EO is not None


def _backward(ctx, grad_y_SO):
    x_TI, weight_EOI, offsets_E1, row_token_S = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    grad_x, grad_weight, grad_bias = gather_grouped_linear_backward(
        grad_y_SO.contiguous(), x_TI, weight_EOI, offsets_E1, row_token_S, need_x, need_weight, need_bias
    )
    return grad_x if need_x else None, grad_weight if need_weight else None, grad_bias if need_bias else None, None, None


gather_grouped_linear.register_autograd(_backward, setup_context=_setup_context)
