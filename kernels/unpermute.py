"""``moefx::unpermute``: weighted combine of expert outputs back into token order.

Legend: T tokens, D model dim, K top-k, S = T*K slots; ``slot_row_S`` from ``moefx::permute``.

    out_TD[t] = sum_k weights_TK[t, k] * y_SD[slot_row_S[t*K + k]]

A gather then a K-term sum per token: deterministic, no atomics. The sum runs in at least fp32
(bf16/fp16 inputs are upcast) and the result has ``y_SD``'s dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(y_SD: Tensor, weights_TK: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(y_SD.dtype, weights_TK.dtype), torch.float32)


def _check(y_SD: Tensor, weights_TK: Tensor, slot_row_S: Tensor) -> None:
    S = weights_TK.numel()
    if y_SD.dim() != 2 or weights_TK.dim() != 2 or y_SD.shape[0] != S or slot_row_S.shape != (S,):
        raise ValueError(
            f"moefx::unpermute expects y [T*K, d], weights [T, K] and slot_row [T*K], got "
            f"{tuple(y_SD.shape)}, {tuple(weights_TK.shape)} and {tuple(slot_row_S.shape)}"
        )


@torch.library.custom_op("moefx::unpermute", mutates_args=())
def unpermute(y_SD: Tensor, weights_TK: Tensor, slot_row_S: Tensor) -> Tensor:
    _check(y_SD, weights_TK, slot_row_S)
    T, K = weights_TK.shape
    dtype = _compute_dtype(y_SD, weights_TK)
    y_TKD = y_SD.index_select(0, slot_row_S).view(T, K, -1).to(dtype)
    out_TD = torch.bmm(weights_TK.to(dtype).unsqueeze(1), y_TKD).squeeze(1)
    return out_TD.to(y_SD.dtype)


@unpermute.register_fake
def _(y_SD, weights_TK, slot_row_S):
    _check(y_SD, weights_TK, slot_row_S)
    return y_SD.new_empty((weights_TK.shape[0], y_SD.shape[1]))


@torch.library.custom_op("moefx::unpermute_backward", mutates_args=())
def unpermute_backward(
    grad_out_TD: Tensor, y_SD: Tensor, weights_TK: Tensor, slot_row_S: Tensor
) -> tuple[Tensor, Tensor]:
    """Returns ``(grad_y_SD, grad_weights_TK)``."""
    T, K = weights_TK.shape
    dtype = _compute_dtype(y_SD, weights_TK)
    g_TD = grad_out_TD.to(dtype)
    y_TKD = y_SD.index_select(0, slot_row_S).view(T, K, -1).to(dtype)
    grad_weights_TK = torch.bmm(y_TKD, g_TD.unsqueeze(2)).squeeze(2)
    grad_slots_SD = (weights_TK.to(dtype).unsqueeze(2) * g_TD.unsqueeze(1)).view(T * K, -1)
    # slot_row is a permutation, so this scatter writes every row exactly once.
    grad_y_SD = torch.empty_like(y_SD).index_copy_(0, slot_row_S, grad_slots_SD.to(y_SD.dtype))
    return grad_y_SD, grad_weights_TK.to(weights_TK.dtype)


@unpermute_backward.register_fake
def _(grad_out_TD, y_SD, weights_TK, slot_row_S):
    return torch.empty_like(y_SD), torch.empty_like(weights_TK)


def _setup_context(ctx, inputs, output):
    y_SD, weights_TK, slot_row_S = inputs
    ctx.save_for_backward(y_SD, weights_TK, slot_row_S)


def _backward(ctx, grad_out_TD):
    y_SD, weights_TK, slot_row_S = ctx.saved_tensors
    grad_y_SD, grad_weights_TK = unpermute_backward(grad_out_TD, y_SD, weights_TK, slot_row_S)
    return grad_y_SD, grad_weights_TK, None


unpermute.register_autograd(_backward, setup_context=_setup_context)
