"""``moefx::route``: router logits to the top-k experts of every token.

Legend: T tokens, E experts, K top-k.

Two softmax placements (both common in the wild):
- ``softmax_first``: probs = softmax(logits) over all E, take the top-k probabilities, and if
  ``renormalize`` divide them by their sum (Switch without, GShard/Mixtral-style with).
- not ``softmax_first``: take the top-k logits, softmax over those K (noisy top-k, Mixtral as
  written); the weights sum to one by construction, so ``renormalize`` changes nothing.

Math runs in at least fp32 whatever the logits' dtype, and the weights come back in that dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.kernels.ops.dtypes import at_least_fp32


def count_choices(experts_TK: Tensor, num_experts: int) -> Tensor:
    """Choices per expert, int64 ``[E]``. Not ``bincount``: it sizes its output from the largest
    value, a device-to-host sync on a GPU. Integer sums are exact in any order, so the atomics of
    ``scatter_add_`` keep this deterministic."""
    ones = torch.ones_like(experts_TK).reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=experts_TK.device).scatter_add_(0, experts_TK.reshape(-1), ones)


def _check(logits_TE: Tensor, top_k: int) -> None:
    if logits_TE.dim() != 2:
        raise ValueError(f"moefx::route expects logits of shape [tokens, experts], got {tuple(logits_TE.shape)}")
    if not 1 <= top_k <= logits_TE.shape[1]:
        raise ValueError(f"moefx::route: top_k={top_k} must be in [1, num_experts={logits_TE.shape[1]}]")


@torch.library.custom_op("moefx::route", mutates_args=())
def route(logits_TE: Tensor, top_k: int, renormalize: bool, softmax_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(weights_TK, experts_TK, counts_E)``; ``counts_E`` is a histogram of ``experts_TK``."""
    _check(logits_TE, top_k)
    return route_with_torch(logits_TE, top_k, renormalize, softmax_first)


def route_with_torch(logits_TE: Tensor, top_k: int, renormalize: bool, softmax_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The default implementation, in torch ops (any device; the CUDA kernel uses it for fp64)."""
    logits = logits_TE.to(at_least_fp32(logits_TE.dtype))
    if softmax_first:
        weights_TK, experts_TK = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        if renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    else:
        top_TK, experts_TK = logits.topk(top_k, dim=-1)
        weights_TK = torch.softmax(top_TK, dim=-1)
    return weights_TK, experts_TK, count_choices(experts_TK, logits_TE.shape[1])


@route.register_fake
def _(logits_TE, top_k, renormalize, softmax_first):
    _check(logits_TE, top_k)
    T, E = logits_TE.shape
    weights_TK = logits_TE.new_empty((T, top_k), dtype=at_least_fp32(logits_TE.dtype))
    experts_TK = logits_TE.new_empty((T, top_k), dtype=torch.int64)
    counts_E = logits_TE.new_empty((E,), dtype=torch.int64)
    return weights_TK, experts_TK, counts_E


@torch.library.custom_op("moefx::route_backward", mutates_args=())
def route_backward(
    grad_weights_TK: Tensor, logits_TE: Tensor, experts_TK: Tensor, renormalize: bool, softmax_first: bool
) -> Tensor:
    """Gradient of the logits from the gradient of the weights (indices and counts carry none)."""
    dtype = at_least_fp32(logits_TE.dtype)
    logits = logits_TE.to(dtype)
    g_TK = grad_weights_TK.to(dtype)
    if softmax_first:
        probs_TE = torch.softmax(logits, dim=-1)
        if renormalize:
            raw_TK = probs_TE.gather(1, experts_TK)
            total_T1 = raw_TK.sum(dim=-1, keepdim=True)
            # w = raw / sum(raw)  =>  d raw_j = (g_j - sum_i g_i w_i) / sum(raw)
            g_TK = (g_TK - (g_TK * raw_TK).sum(-1, keepdim=True) / total_T1) / total_T1
        grad_probs_TE = torch.zeros_like(probs_TE).scatter_(1, experts_TK, g_TK)
        grad_TE = probs_TE * (grad_probs_TE - (grad_probs_TE * probs_TE).sum(-1, keepdim=True))
    else:
        weights_TK = torch.softmax(logits.gather(1, experts_TK), dim=-1)
        grad_top_TK = weights_TK * (g_TK - (g_TK * weights_TK).sum(-1, keepdim=True))
        grad_TE = torch.zeros_like(logits).scatter_(1, experts_TK, grad_top_TK)
    return grad_TE.to(logits_TE.dtype)


@route_backward.register_fake
def _(grad_weights_TK, logits_TE, experts_TK, renormalize, softmax_first):
    return torch.empty_like(logits_TE)


def _setup_context(ctx, inputs, output):
    logits_TE, _, renormalize, softmax_first = inputs
    _, experts_TK, _ = output
    ctx.save_for_backward(logits_TE, experts_TK)
    ctx.renormalize = renormalize
    ctx.softmax_first = softmax_first


def _backward(ctx, grad_weights_TK, grad_experts, grad_counts):
    logits_TE, experts_TK = ctx.saved_tensors
    grad_TE = route_backward(grad_weights_TK, logits_TE, experts_TK, ctx.renormalize, ctx.softmax_first)
    return grad_TE, None, None, None


route.register_autograd(_backward, setup_context=_setup_context)
