"""``moefx::unpermute``: weighted combine of expert outputs back into token order.

Legend: T tokens, D model dim, K top-k, S = T*K slots; ``slot_row_S`` and its inverse
``row_slot_S`` from ``moefx::permute``.

    out_TD[t] = sum_k weights_TK[t, k] * y_SD[slot_row_S[t*K + k]]

A gather then a K-term sum per token, in choice order: deterministic, no atomics. The sum runs
in at least fp32 (bf16/fp16 inputs are upcast) and the result has ``y_SD``'s dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.kernels.ops.dtypes import at_least_fp32


def _check(y_SD: Tensor, weights_TK: Tensor, slot_row_S: Tensor, row_slot_S: Tensor) -> None:
    S = weights_TK.numel()
    shapes_ok = y_SD.dim() == 2 and weights_TK.dim() == 2 and y_SD.shape[0] == S
    if not shapes_ok or slot_row_S.shape != (S,) or row_slot_S.shape != (S,):
        raise ValueError(
            f"moefx::unpermute expects y [T*K, d], weights [T, K], slot_row and row_slot [T*K], got "
            f"{tuple(y_SD.shape)}, {tuple(weights_TK.shape)}, {tuple(slot_row_S.shape)} and {tuple(row_slot_S.shape)}"
        )


@torch.library.custom_op("moefx::unpermute", mutates_args=())
def unpermute(y_SD: Tensor, weights_TK: Tensor, slot_row_S: Tensor, row_slot_S: Tensor) -> Tensor:
    _check(y_SD, weights_TK, slot_row_S, row_slot_S)
    T, K = weights_TK.shape
    dtype = at_least_fp32(y_SD.dtype, weights_TK.dtype)
    slot_row_TK = slot_row_S.view(T, K)
    weights_TK = weights_TK.to(dtype)
    # One [T, D] gather per choice, accumulated in place, instead of one [T*K, D] gather and a
    # batched matmul: K is small, and this measured faster on CPU (no [T*K, D] temporary).
    out_TD = y_SD.index_select(0, slot_row_TK[:, 0]).to(dtype).mul_(weights_TK[:, :1])
    for k in range(1, K):
        out_TD.addcmul_(y_SD.index_select(0, slot_row_TK[:, k]).to(dtype), weights_TK[:, k : k + 1])
    return out_TD.to(y_SD.dtype)


@unpermute.register_fake
def _(y_SD, weights_TK, slot_row_S, row_slot_S):
    _check(y_SD, weights_TK, slot_row_S, row_slot_S)
    return y_SD.new_empty((weights_TK.shape[0], y_SD.shape[1]))


@torch.library.custom_op("moefx::unpermute_backward", mutates_args=())
def unpermute_backward(
    grad_out_TD: Tensor, y_SD: Tensor, weights_TK: Tensor, row_slot_S: Tensor
) -> tuple[Tensor, Tensor]:
    """Returns ``(grad_y_SD, grad_weights_TK)``, computed in row order: one gather of the
    output gradient serves both (row r holds slot s = row_slot[r] of token s // K)."""
    T, K = weights_TK.shape
    dtype = at_least_fp32(y_SD.dtype, weights_TK.dtype)
    g_SD = grad_out_TD.index_select(0, row_slot_S // K).to(dtype)
    grad_w_S = torch.einsum("sd,sd->s", y_SD.to(dtype), g_SD)
    grad_weights_TK = torch.empty_like(grad_w_S).scatter_(0, row_slot_S, grad_w_S).view(T, K)
    grad_y_SD = g_SD.mul_(weights_TK.reshape(-1).to(dtype).index_select(0, row_slot_S).unsqueeze(1))
    return grad_y_SD.to(y_SD.dtype), grad_weights_TK.to(weights_TK.dtype)


@unpermute_backward.register_fake
def _(grad_out_TD, y_SD, weights_TK, row_slot_S):
    return torch.empty_like(y_SD), torch.empty_like(weights_TK)


def _setup_context(ctx, inputs, output):
    y_SD, weights_TK, _, row_slot_S = inputs
    ctx.save_for_backward(y_SD, weights_TK, row_slot_S)


def _backward(ctx, grad_out_TD):
    y_SD, weights_TK, row_slot_S = ctx.saved_tensors
    grad_y_SD, grad_weights_TK = unpermute_backward(grad_out_TD, y_SD, weights_TK, row_slot_S)
    return grad_y_SD, grad_weights_TK, None, None


unpermute.register_autograd(_backward, setup_context=_setup_context)
