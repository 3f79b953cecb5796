"""Slow, obviously-right versions of the moefx ops, written as loops over tokens and rows.

Tests compare the ops (outputs and gradients, through autograd on these) against them. They
follow the definitions in the op modules' docstrings, not the op implementations.

Legend: T tokens, D model dim, E experts, K top-k, S = T*K slots, I/O in/out features.
"""

from __future__ import annotations

import torch
from torch import Tensor


def route(logits_TE: Tensor, top_k: int, renormalize: bool, softmax_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per token: sort experts by logit (ties: lower index first), keep K, weight them."""
    T, E = logits_TE.shape
    logits = logits_TE.to(torch.float64)
    weights, experts = [], []
    for t in range(T):
        chosen = sorted(range(E), key=lambda e: (-logits[t, e].item(), e))[:top_k]
        if softmax_first:
            probs = torch.exp(logits[t]) / torch.exp(logits[t]).sum()
            w = torch.stack([probs[e] for e in chosen])
            if renormalize:
                w = w / w.sum()
        else:
            top = torch.stack([logits[t, e] for e in chosen])
            w = torch.exp(top) / torch.exp(top).sum()
        weights.append(w)
        experts.append(torch.tensor(chosen))
    weights_TK, experts_TK = torch.stack(weights), torch.stack(experts)
    counts_E = torch.tensor([int((experts_TK == e).sum()) for e in range(E)])
    return weights_TK, experts_TK, counts_E


def dispatch_layout(experts_TK: Tensor, num_experts: int, capacity: int | None) -> tuple[list[int], list[int]]:
    """``(row_slot, offsets)`` as lists: slots by expert, in (choice, token) priority, capacity applied;
    then the dropped slots, by expert (the nowhere expert E last), in the same priority."""
    T, K = experts_TK.shape
    kept: list[list[int]] = [[] for _ in range(num_experts)]
    dropped: list[list[int]] = [[] for _ in range(num_experts + 1)]
    for k in range(K):
        for t in range(T):
            e, slot = int(experts_TK[t, k]), t * K + k
            if e < num_experts and (capacity is None or len(kept[e]) < capacity):
                kept[e].append(slot)
            else:
                dropped[e].append(slot)
    offsets = [0]
    for rows in kept:
        offsets.append(offsets[-1] + len(rows))
    return [slot for rows in kept + dropped for slot in rows], offsets


def permute(x_TD: Tensor, experts_TK: Tensor, num_experts: int, capacity: int | None) -> tuple[Tensor, list[int], list[int]]:
    row_slot, offsets = dispatch_layout(experts_TK, num_experts, capacity)
    K = experts_TK.shape[1]
    x_SD = torch.stack([x_TD[slot // K] for slot in row_slot])
    return x_SD, row_slot, offsets


def grouped_linear(x_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets: list[int]) -> Tensor:
    rows = []
    for r in range(x_SI.shape[0]):
        experts = [e for e in range(weight_EOI.shape[0]) if offsets[e] <= r < offsets[e + 1]]
        if not experts:
            rows.append(x_SI.new_zeros(weight_EOI.shape[1]))
            continue
        (e,) = experts
        y = weight_EOI[e] @ x_SI[r]
        rows.append(y if bias_EO is None else y + bias_EO[e])
    return torch.stack(rows)


def unpermute(y_SD: Tensor, weights_TK: Tensor, row_slot: list[int]) -> Tensor:
    T, K = weights_TK.shape
    row_of_slot = {slot: r for r, slot in enumerate(row_slot)}
    out = []
    for t in range(T):
        acc = sum(weights_TK[t, k].to(y_SD.dtype) * y_SD[row_of_slot[t * K + k]] for k in range(K))
        out.append(acc)
    return torch.stack(out)


def gather_grouped_linear(x_TI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets: list[int], row_token: list[int]) -> Tensor:
    """Gather the rows, then the grouped linear."""
    return grouped_linear(torch.stack([x_TI[t] for t in row_token]), weight_EOI, bias_EO, offsets)


def grouped_linear_combine(
    h_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets: list[int], row_slot: list[int], weights_TK: Tensor
) -> Tensor:
    """The grouped linear (dropped rows give zeros), then the weighted combine."""
    return unpermute(grouped_linear(h_SI, weight_EOI, bias_EO, offsets), weights_TK, row_slot)
