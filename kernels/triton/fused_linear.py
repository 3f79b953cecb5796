"""Triton implementations of ``moefx::gather_grouped_linear`` and ``moefx::grouped_linear_combine``.

Legend: T tokens, K top-k, S = T*K rows, I in features, O out features, E experts.

Both run the kernels of ``triton_grouped_linear`` with their fused options (ScatterMoE's idea):

- gather: the first linear reads token rows through ``row_slot_S // K`` in its loads, so the
  permuted ``[S, I]`` input never exists. Backward: dW gathers the same way; dX is computed per
  row, stored at its slot, and summed per token, K terms in choice order (deterministic).
- combine: the second linear multiplies each row by its routing weight in the epilogue and
  stores it at its slot (a permutation, so no two programs write one place); the K slots of a
  token are then summed in fp32, in choice order: no atomics. Backward: the output gradient is
  gathered by token in the loads; one kernel's epilogue scales dX by the routing weight and
  takes the routing weights' gradient (a row dot with the forward input) from its accumulator,
  and the routing weight scales dY inside the dW kernel.

No device-to-host sync anywhere: every size comes from shapes, and the kernels read the offsets
on the device. Tested on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.kernels.ops.dtypes import at_least_fp32
from moefx.kernels.ops.gather_grouped_linear import top_k_of
from moefx.kernels.triton.grouped_linear import segment_matmul, segment_matmul_row_dots, segment_outer


def gather_grouped_linear_forward(
    x_TI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor, row_slot_S: Tensor, slot_row_S: Tensor
) -> Tensor:
    row_token_S = row_slot_S // top_k_of(x_TI, row_slot_S)
    return segment_matmul(x_TI, weight_EOI.transpose(1, 2), bias_EO, offsets_E1, a_rows_S=row_token_S)


def gather_grouped_linear_backward(
    grad_y_SO: Tensor, x_TI: Tensor, weight_EOI: Tensor, offsets_E1: Tensor, row_slot_S: Tensor, slot_row_S: Tensor,
    need_x: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as the op ``moefx::gather_grouped_linear_backward``: unneeded gradients are empty."""
    T, K = x_TI.shape[0], top_k_of(x_TI, row_slot_S)
    grad_x = x_TI.new_empty(0)
    if need_x:
        # Each row's dX stored at its slot (dropped rows as zeros), so the K slots of a token sit together.
        grad_x_SI = segment_matmul(grad_y_SO, weight_EOI, None, offsets_E1, out_rows_S=row_slot_S)
        grad_x = grad_x_SI.view(T, K, -1).sum(1, dtype=at_least_fp32(x_TI.dtype))
        grad_x = grad_x.to(x_TI.dtype)
    grad_w, grad_b = weight_EOI.new_empty(0), weight_EOI.new_empty(0)
    if need_weight or need_bias:
        dw, db = segment_outer(grad_y_SO, x_TI, offsets_E1, weight_EOI.shape[0], need_bias, x_rows_S=row_slot_S // K)
        grad_w = dw if need_weight else grad_w
        grad_b = db if need_bias else grad_b
    return grad_x, grad_w, grad_b


def grouped_linear_combine_forward(
    h_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor, row_slot_S: Tensor, weights_TK: Tensor
) -> Tensor:
    T, K = weights_TK.shape
    w_S = weights_TK.reshape(-1).index_select(0, row_slot_S)  # each row's routing weight
    # Rows past offsets[E] (dropped) are stored as zeros at their slots.
    y_slots = segment_matmul(h_SI, weight_EOI.transpose(1, 2), bias_EO, offsets_E1, out_rows_S=row_slot_S, scale_S=w_S)
    return y_slots.view(T, K, -1).sum(1, dtype=at_least_fp32(h_SI.dtype, weights_TK.dtype)).to(h_SI.dtype)


def grouped_linear_combine_backward(
    grad_out_TO: Tensor, h_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor,
    row_slot_S: Tensor, weights_TK: Tensor, need_h: bool, need_weight: bool, need_bias: bool, need_weights: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as the op ``moefx::grouped_linear_combine_backward``: unneeded gradients are empty."""
    T, K = weights_TK.shape
    E = weight_EOI.shape[0]
    acc_dtype = at_least_fp32(h_SI.dtype, weights_TK.dtype)
    row_token_S = row_slot_S // K
    w_S = weights_TK.reshape(-1).index_select(0, row_slot_S)
    grad_h, grad_weights = h_SI.new_empty(0), weights_TK.new_empty(0)
    if need_weights:
        # One kernel: grad_h (each row's gradient times its routing weight, in the epilogue) and
        # the routing weights' gradient rowsum(gh * h) from the unscaled fp32 accumulator.
        grad_h, grad_w_S = segment_matmul_row_dots(
            grad_out_TO, weight_EOI, offsets_E1, h_SI, a_rows_S=row_token_S, scale_S=w_S if need_h else None
        )
        if bias_EO is not None:
            grad_w_S += _bias_term(grad_out_TO, bias_EO, offsets_E1, row_token_S, acc_dtype)
        flat = torch.empty_like(grad_w_S).scatter_(0, row_slot_S, grad_w_S)  # a permutation: no collisions
        grad_weights = flat.view(T, K).to(weights_TK.dtype)
        grad_h = grad_h if need_h else h_SI.new_empty(0)
    elif need_h:  # dropped rows are zero
        grad_h = segment_matmul(grad_out_TO, weight_EOI, None, offsets_E1, a_rows_S=row_token_S, scale_S=w_S)
    grad_w, grad_b = weight_EOI.new_empty(0), weight_EOI.new_empty(0)
    if need_weight or need_bias:
        dw, db = segment_outer(grad_out_TO, h_SI, offsets_E1, E, need_bias, dy_rows_S=row_token_S, scale_S=w_S)
        grad_w = dw if need_weight else grad_w
        grad_b = db if need_bias else grad_b
    return grad_h, grad_w, grad_b, grad_weights


def _bias_term(grad_out_TO: Tensor, bias_EO: Tensor, offsets_E1: Tensor, row_token_S: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad_out[token] . bias[expert]`` per row (zero for dropped rows): the bias's share of the
    routing weight's gradient."""
    E, S = bias_EO.shape[0], row_token_S.shape[0]
    expert_S = torch.searchsorted(offsets_E1[1:], torch.arange(S, device=offsets_E1.device), right=True)
    bias_SO = bias_EO.index_select(0, expert_S.clamp(max=E - 1)).to(dtype)
    term = (grad_out_TO.index_select(0, row_token_S).to(dtype) * bias_SO).sum(1)
    return torch.where(expert_S < E, term, 0.0)
