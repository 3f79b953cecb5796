"""Triton kernel for ``moefx::route``: logits → (softmax) → top-k → (renormalise), one pass per
block of tokens, in fp32 whatever the logits' dtype.

Legend: T tokens, E experts, K top-k, BT tokens per program, BE = next power of two >= E.

Each program loads BT rows of logits (padding experts read as -inf), and picks the K largest by
K rounds of max/argmax, each round masking its winner. Ties go to the lower expert index. The
per-expert counts are an integer ``scatter_add_`` of the chosen experts afterwards: exact and
deterministic, no host sync. Registered for CUDA by ``moefx.kernels.cuda.registration``; runs on CPU
tensors under ``TRITON_INTERPRET=1`` for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moefx.kernels.ops.route import count_choices


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, experts_ptr, T, E, stride_t, stride_e,
    K: tl.constexpr, KP: tl.constexpr, RENORMALIZE: tl.constexpr, SOFTMAX_FIRST: tl.constexpr, BT: tl.constexpr,
    BE: tl.constexpr,
):
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    token_ok = tokens < T
    logits = tl.load(logits_ptr + tokens[:, None] * stride_t + cols[None, :] * stride_e,
                     mask=token_ok[:, None] & (cols[None, :] < E), other=float("-inf")).to(tl.float32)
    if SOFTMAX_FIRST:
        shifted = logits - tl.max(logits, 1)[:, None]
        numerator = tl.exp(shifted)
        scores = numerator / tl.sum(numerator, 1)[:, None]
    else:
        scores = logits
    ks = tl.arange(0, KP)  # K padded to a power of two; the padding stays -inf and is not stored
    picked_scores = tl.full((BT, KP), float("-inf"), dtype=tl.float32)
    picked_experts = tl.zeros((BT, KP), dtype=tl.int64)
    for k in tl.static_range(K):
        best = tl.max(scores, 1)
        # The lowest index among the maxima (ties to the lower expert, as documented).
        index = tl.min(tl.where(scores == best[:, None], cols[None, :], BE), 1)
        # A NaN row matches no maximum: it still gets a real expert (its weights stay NaN).
        index = tl.minimum(index, E - 1)
        picked_scores = tl.where(ks[None, :] == k, best[:, None], picked_scores)
        picked_experts = tl.where(ks[None, :] == k, index[:, None].to(tl.int64), picked_experts)
        scores = tl.where(cols[None, :] == index[:, None], float("-inf"), scores)
    if SOFTMAX_FIRST:
        weights = tl.where(ks[None, :] < K, picked_scores, 0.0)
        if RENORMALIZE:
            weights = weights / tl.sum(weights, 1)[:, None]
    else:
        top = tl.exp(picked_scores - tl.max(picked_scores, 1)[:, None])
        weights = top / tl.sum(top, 1)[:, None]
    out = tokens[:, None] * K + ks[None, :]
    store_ok = token_ok[:, None] & (ks[None, :] < K)
    tl.store(weights_ptr + out, weights, mask=store_ok)
    tl.store(experts_ptr + out, picked_experts, mask=store_ok)


def route(logits_TE: Tensor, top_k: int, renormalize: bool, softmax_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as ``moefx::route`` for fp32/bf16/fp16 logits: ``(weights_TK fp32, experts_TK, counts_E)``."""
    T, E = logits_TE.shape
    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits_TE.device)
    experts = torch.empty((T, top_k), dtype=torch.int64, device=logits_TE.device)
    BE = triton.next_power_of_2(E)
    BT = max(1, min(64, 4096 // BE))  # keep a program's tile near 4K scores
    _route_kernel[(triton.cdiv(T, BT),)](
        logits_TE, weights, experts, T, E, logits_TE.stride(0), logits_TE.stride(1),
        K=top_k, KP=triton.next_power_of_2(top_k), RENORMALIZE=renormalize, SOFTMAX_FIRST=softmax_first, BT=BT, BE=BE,
    )
    return weights, experts, count_choices(experts, E)
