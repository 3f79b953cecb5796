"""``moefx::grouped_linear_combine``: a grouped linear whose rows are summed straight into token order.

Legend: T tokens, K top-k, S = T*K rows (permuted slots), I in features, O out features,
E experts; ``row_slot_S`` from ``moefx::permute`` (row r holds slot ``t*K + k``).

    out_TO[t] = sum over kept rows r of token t:  weights_TK[t, k] * (h_SI[r] @ weight_EOI[e].T + bias_EO[e])

where r = row of slot ``t*K + k``, e its expert, and kept rows are those before ``offsets[E]``
(dropped rows add nothing). It equals ``moefx::grouped_linear`` followed by ``moefx::unpermute``,
without the ``[S, O]`` expert output: each expert's rows go through a scratch buffer that stays
in cache and are added, weighted, into their tokens.

The sum runs in at least fp32, expert by expert (``index_add_``: deterministic, and a token
appears at most once per expert), so the order of its terms is by expert, not by choice.

Backward, per expert, with ``g_e`` the output gradient of its rows' tokens:
``grad_h = w * (g_e @ W_e)``, ``grad_W_e = g_e^T @ (w * h_e)``, ``grad_b_e = w @ g_e`` and
``grad_weights = rowsum((g_e @ W_e) * h_e) + g_e @ b_e``: the routing weights' gradient comes
from the ``[rows, I]`` product the input gradient needs anyway, so the ``[S, O]`` expert output
is neither kept nor recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.kernels.ops.dtypes import at_least_fp32
from moefx.kernels.ops.segments import check_grouped_weights, expert_segments, largest_segment, weight_grad_buffer

OP = "moefx::grouped_linear_combine"


def _check(
    h_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor, row_slot_S: Tensor, weights_TK: Tensor
) -> None:
    check_grouped_weights(OP, h_SI, weight_EOI, bias_EO, offsets_E1)
    S = weights_TK.numel()
    if weights_TK.dim() != 2 or h_SI.shape[0] != S or row_slot_S.shape != (S,):
        raise ValueError(
            f"{OP} expects h [T*K, in], row_slot [T*K] and weights [T, K], got "
            f"{tuple(h_SI.shape)}, {tuple(row_slot_S.shape)} and {tuple(weights_TK.shape)}"
        )


def _row_tokens_and_weights(row_slot_S: Tensor, weights_TK: Tensor, kept: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Token and routing weight of each kept row."""
    slots = row_slot_S[:kept]
    return slots // weights_TK.shape[1], weights_TK.reshape(-1).to(dtype).index_select(0, slots)


@torch.library.custom_op(OP, mutates_args=())
def grouped_linear_combine(
    h_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor, row_slot_S: Tensor, weights_TK: Tensor
) -> Tensor:
    _check(h_SI, weight_EOI, bias_EO, offsets_E1, row_slot_S, weights_TK)
    segments, kept = expert_segments(OP, offsets_E1, h_SI.shape[0])
    acc_dtype = at_least_fp32(h_SI.dtype, weights_TK.dtype)
    tokens_S, w_S = _row_tokens_and_weights(row_slot_S, weights_TK, kept, acc_dtype)
    out_TO = h_SI.new_zeros((weights_TK.shape[0], weight_EOI.shape[1]), dtype=acc_dtype)
    rows = largest_segment(segments)
    y_scratch = h_SI.new_empty((rows, weight_EOI.shape[1]))
    # w * (h @ W^T) = (w * h) @ W^T: without a bias, the routing weight scales the narrower side.
    scale_input = bias_EO is None and h_SI.shape[1] < weight_EOI.shape[1]
    h_scratch = h_SI.new_empty((rows, h_SI.shape[1])) if scale_input else None
    for e, a, b in segments:
        y_e, w_e = y_scratch[: b - a], w_S[a:b, None]
        if scale_input:
            torch.mm(torch.mul(h_SI[a:b], w_e, out=h_scratch[: b - a]), weight_EOI[e].t(), out=y_e)
            out_TO.index_add_(0, tokens_S[a:b], y_e.to(acc_dtype))
            continue
        if bias_EO is None:
            torch.mm(h_SI[a:b], weight_EOI[e].t(), out=y_e)
        else:
            torch.addmm(bias_EO[e], h_SI[a:b], weight_EOI[e].t(), out=y_e)
        out_TO.index_add_(0, tokens_S[a:b], y_e.to(acc_dtype).mul_(w_e))
    return out_TO.to(h_SI.dtype)


@grouped_linear_combine.register_fake
def _(h_SI, weight_EOI, bias_EO, offsets_E1, row_slot_S, weights_TK):
    _check(h_SI, weight_EOI, bias_EO, offsets_E1, row_slot_S, weights_TK)
    return h_SI.new_empty((weights_TK.shape[0], weight_EOI.shape[1]))


@torch.library.custom_op("moefx::grouped_linear_combine_backward", mutates_args=())
def grouped_linear_combine_backward(
    grad_out_TO: Tensor, h_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor,
    row_slot_S: Tensor, weights_TK: Tensor, need_h: bool, need_weight: bool, need_bias: bool, need_weights: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(grad_h_SI, grad_weight_EOI, grad_bias_EO, grad_weights_TK)``; one not needed is empty."""
    segments, kept = expert_segments(OP, offsets_E1, h_SI.shape[0])
    acc_dtype = at_least_fp32(h_SI.dtype, weights_TK.dtype)
    tokens_S, w_S = _row_tokens_and_weights(row_slot_S, weights_TK, kept, acc_dtype)
    w_S_low = w_S.to(h_SI.dtype)  # the scale applied to h-dtype rows
    # Only what no segment writes is zeroed: dropped rows, and experts that got no rows.
    grad_h_SI = torch.empty_like(h_SI) if need_h else h_SI.new_empty(0)
    grad_h_SI[kept:].zero_()
    grad_weight_EOI = weight_grad_buffer(weight_EOI, segments) if need_weight else weight_EOI.new_empty(0)
    grad_bias_EO = weight_EOI.new_zeros(weight_EOI.shape[:2]) if need_bias else weight_EOI.new_empty(0)
    grad_w_S = h_SI.new_zeros(kept, dtype=acc_dtype) if need_weights else None
    g_scratch = grad_out_TO.new_empty((largest_segment(segments), weight_EOI.shape[1]))
    for e, a, b in segments:
        g_e = torch.index_select(grad_out_TO, 0, tokens_S[a:b], out=g_scratch[: b - a])
        h_e, w_e = h_SI[a:b], w_S_low[a:b, None]
        if need_h or need_weights:
            gh_e = torch.mm(g_e, weight_EOI[e])  # the gradient of h_e before the routing weight
            if need_weights:
                grad_w_S[a:b] = (gh_e * h_e).sum(1, dtype=acc_dtype)
                if bias_EO is not None:
                    grad_w_S[a:b] += torch.mv(g_e.to(acc_dtype), bias_EO[e].to(acc_dtype))
            if need_h:
                torch.mul(gh_e, w_e, out=grad_h_SI[a:b])
        if need_weight:  # weight whichever side is narrower
            if h_e.shape[1] <= g_e.shape[1]:
                torch.mm(g_e.t(), h_e * w_e, out=grad_weight_EOI[e])
            else:
                torch.mm((g_e * w_e).t(), h_e, out=grad_weight_EOI[e])
        if need_bias:
            grad_bias_EO[e] = torch.mv(g_e.t().to(acc_dtype), w_S[a:b]).to(grad_bias_EO.dtype)
    grad_weights_TK = weights_TK.new_empty(0)
    if need_weights:
        flat = weights_TK.new_zeros(weights_TK.numel(), dtype=acc_dtype)
        flat.index_copy_(0, row_slot_S[:kept], grad_w_S)
        grad_weights_TK = flat.view(weights_TK.shape).to(weights_TK.dtype)
    return grad_h_SI, grad_weight_EOI, grad_bias_EO, grad_weights_TK


@grouped_linear_combine_backward.register_fake
def _(grad_out_TO, h_SI, weight_EOI, bias_EO, offsets_E1, row_slot_S, weights_TK, need_h, need_weight, need_bias, need_weights):
    return (
        torch.empty_like(h_SI) if need_h else h_SI.new_empty(0),
        torch.empty_like(weight_EOI) if need_weight else weight_EOI.new_empty(0),
        weight_EOI.new_empty(weight_EOI.shape[:2]) if need_bias else weight_EOI.new_empty(0),
        torch.empty_like(weights_TK) if need_weights else weights_TK.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    h_SI, weight_EOI, bias_EO, offsets_E1, row_slot_S, weights_TK = inputs
    ctx.save_for_backward(h_SI, weight_EOI, bias_EO, offsets_E1, row_slot_S, weights_TK)


def _backward(ctx, grad_out_TO):
    h_SI, weight_EOI, bias_EO, offsets_E1, row_slot_S, weights_TK = ctx.saved_tensors
    need_h, need_weight, need_bias, _, _, need_weights = ctx.needs_input_grad
    need_bias = need_bias and bias_EO is not None
    grad_h, grad_weight, grad_bias, grad_weights = grouped_linear_combine_backward(
        grad_out_TO.contiguous(), h_SI, weight_EOI, bias_EO, offsets_E1, row_slot_S, weights_TK,
        need_h, need_weight, need_bias, need_weights,
    )
    return (
        grad_h if need_h else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
        None,
        None,
        grad_weights if need_weights else None,
    )


grouped_linear_combine.register_autograd(_backward, setup_context=_setup_context)
