"""``moefx::gather_grouped_linear``: a grouped linear that reads its rows straight from token order.

Legend: T tokens, K top-k, S = T*K rows (permuted slots), I in features, O out features,
E experts; ``row_slot_S`` and its inverse ``slot_row_S`` from ``moefx::plan_dispatch`` (row r
holds slot ``t*K + k``, so its token is ``row_slot_S[r] // K``; K is ``S / T``).

    y_SO[r] = x_TI[row_slot_S[r] // K] @ weight_EOI[e].T + bias_EO[e]    for offsets[e] <= r < offsets[e+1]
    y_SO[r] = 0                                                          for r >= offsets[E] (dropped rows)

It equals ``moefx::permute`` followed by ``moefx::grouped_linear``, without the permuted
``[S, I]`` copy of the input: each expert gathers its rows into a scratch buffer that stays in
cache, and the buffer is reused by the next expert (the Triton kernel gathers in the GEMM's
loads, as ScatterMoE does). At top-8 that copy is eight times the input; writing it and reading
it back cost more than the gather itself on CPU.

Backward: dX sums each row's gradient back into its token (on CPU ``index_add_``, expert by
expert: deterministic, and a token appears at most once per expert; device kernels gather the
K rows of each token through ``slot_row_S``); dW gathers the input again instead of keeping a
permuted copy alive until the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.kernels.ops.dtypes import at_least_fp32
from moefx.kernels.ops.segments import check_grouped_weights, expert_segments, largest_segment, weight_grad_buffer

OP = "moefx::gather_grouped_linear"


def _check(x_TI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor, row_slot_S: Tensor,
           slot_row_S: Tensor) -> None:
    check_grouped_weights(OP, x_TI, weight_EOI, bias_EO, offsets_E1)
    S, T = row_slot_S.shape[0] if row_slot_S.dim() == 1 else -1, x_TI.shape[0]
    index_ok = all(t.dim() == 1 and t.dtype in (torch.int32, torch.int64) for t in (row_slot_S, slot_row_S))
    if not index_ok or slot_row_S.shape != row_slot_S.shape or (S % T if T else S):
        raise ValueError(
            f"{OP}: row_slot and slot_row must be 1-D integer tensors of T*K entries for x of {T} tokens, "
            f"got {row_slot_S.dtype} {tuple(row_slot_S.shape)} and {slot_row_S.dtype} {tuple(slot_row_S.shape)}; "
            f"take them from moefx::plan_dispatch"
        )


def top_k_of(x_TI: Tensor, row_slot_S: Tensor) -> int:
    """K, from the shapes: S = T*K rows for T tokens."""
    return row_slot_S.shape[0] // x_TI.shape[0] if x_TI.shape[0] else 1


@torch.library.custom_op(OP, mutates_args=())
def gather_grouped_linear(
    x_TI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor, row_slot_S: Tensor, slot_row_S: Tensor
) -> Tensor:
    _check(x_TI, weight_EOI, bias_EO, offsets_E1, row_slot_S, slot_row_S)
    S = row_slot_S.shape[0]
    row_token_S = row_slot_S // top_k_of(x_TI, row_slot_S)
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
def _(x_TI, weight_EOI, bias_EO, offsets_E1, row_slot_S, slot_row_S):
    _check(x_TI, weight_EOI, bias_EO, offsets_E1, row_slot_S, slot_row_S)
    return x_TI.new_empty((row_slot_S.shape[0], weight_EOI.shape[1]))


@torch.library.custom_op("moefx::gather_grouped_linear_backward", mutates_args=())
def gather_grouped_linear_backward(
    grad_y_SO: Tensor, x_TI: Tensor, weight_EOI: Tensor, offsets_E1: Tensor, row_slot_S: Tensor, slot_row_S: Tensor,
    need_x: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_x_TI, grad_weight_EOI, grad_bias_EO)``; a gradient not needed is an empty tensor."""
    segments, _ = expert_segments(OP, offsets_E1, row_slot_S.shape[0])
    row_token_S = row_slot_S // top_k_of(x_TI, row_slot_S)
    acc_dtype = at_least_fp32(x_TI.dtype)
    grad_x_TI = x_TI.new_zeros(x_TI.shape, dtype=acc_dtype) if need_x else x_TI.new_empty(0)
    grad_weight_EOI = weight_grad_buffer(weight_EOI, segments) if need_weight else weight_EOI.new_empty(0)
    grad_bias_EO = weight_EOI.new_zeros(weight_EOI.shape[:2]) if need_bias else weight_EOI.new_empty(0)
    x_scratch, gx_scratch = (x_TI.new_empty((largest_segment(segments), x_TI.shape[1])) for _ in range(2))
    for e, a, b in segments:
        g, tokens = grad_y_SO[a:b], row_token_S[a:b]
        if need_x:
            grad_x_TI.index_add_(0, tokens, torch.mm(g, weight_EOI[e], out=gx_scratch[: b - a]).to(acc_dtype))
        if need_weight:
            x_e = torch.index_select(x_TI, 0, tokens, out=x_scratch[: b - a])
            torch.mm(g.t(), x_e, out=grad_weight_EOI[e])
        if need_bias:
            grad_bias_EO[e] = g.sum(0, dtype=at_least_fp32(g.dtype))
    return grad_x_TI.to(x_TI.dtype), grad_weight_EOI, grad_bias_EO


@gather_grouped_linear_backward.register_fake
def _(grad_y_SO, x_TI, weight_EOI, offsets_E1, row_slot_S, slot_row_S, need_x, need_weight, need_bias):
    return (
        torch.empty_like(x_TI) if need_x else x_TI.new_empty(0),
        torch.empty_like(weight_EOI) if need_weight else weight_EOI.new_empty(0),
        weight_EOI.new_empty(weight_EOI.shape[:2]) if need_bias else weight_EOI.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x_TI, weight_EOI, bias_EO, offsets_E1, row_slot_S, slot_row_S = inputs
    ctx.save_for_backward(x_TI, weight_EOI, offsets_E1, row_slot_S, slot_row_S)
    ctx.has_bias = bias_EO is not None


def _backward(ctx, grad_y_SO):
    x_TI, weight_EOI, offsets_E1, row_slot_S, slot_row_S = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    grad_x, grad_weight, grad_bias = gather_grouped_linear_backward(
        grad_y_SO.contiguous(), x_TI, weight_EOI, offsets_E1, row_slot_S, slot_row_S, need_x, need_weight, need_bias
    )
    grads = grad_x if need_x else None, grad_weight if need_weight else None, grad_bias if need_bias else None
    return (*grads, None, None, None)


gather_grouped_linear.register_autograd(_backward, setup_context=_setup_context)
