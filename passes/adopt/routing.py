"""Which moefx routing a router computes, found by running it: each candidate ``Routing`` is
evaluated on the same probe tokens and kept when it picks the same experts with the same weights.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import Tensor

from moefx.passes.adopt.spec import Routing

_RTOL = 1e-5


def softmax_candidates(weight_ED: Tensor, bias_E: Tensor | None, top_k: int) -> list[Routing]:
    """Token-choice top-k over a softmax: the three forms models use."""
    base = Routing(gate="topk", top_k=top_k, renormalize=True, softmax_first=True, weight_ED=weight_ED, bias_E=bias_E)
    return [base, replace(base, renormalize=False), replace(base, softmax_first=False)]


def sigmoid_candidates(weight_ED: Tensor, top_k: int, score_bias_E: Tensor | None, groups: int, topk_groups: int,
                       routed_scale: float) -> list[Routing]:
    """DeepSeek-V3's sigmoid routing, renormalised or not."""
    base = Routing(gate="sigmoid", top_k=top_k, renormalize=True, weight_ED=weight_ED, score_bias_E=score_bias_E,
                   expert_groups=groups, topk_groups=topk_groups, routed_scale=routed_scale)
    return [base, replace(base, renormalize=False)]


def choose(x_TD: Tensor, weights_TK: Tensor, experts_TK: Tensor, candidates: Iterable[Routing]) -> Routing | None:
    """The first candidate that routes ``x_TD`` as observed (experts and weights, in any order)."""
    observed = _canonical(weights_TK, experts_TK)
    for candidate in candidates:
        if _same(observed, _canonical(*route(candidate, x_TD))):
            return candidate
    return None


def route(r: Routing, x_TD: Tensor) -> tuple[Tensor, Tensor]:
    """``r``'s (weights_TK, experts_TK) in float64: the slow, plain definition of each form."""
    x = x_TD.double()
    logits_TE = x @ r.weight_ED.double().T + (0 if r.bias_E is None else r.bias_E.double())
    if r.gate == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
        choice_TE = scores_TE + (0 if r.score_bias_E is None else r.score_bias_E.double())
        if r.topk_groups is not None and r.topk_groups < r.expert_groups:
            T, E = choice_TE.shape
            grouped = choice_TE.view(T, r.expert_groups, E // r.expert_groups)
            best = grouped.topk(min(2, E // r.expert_groups), dim=-1).values.sum(-1).topk(r.topk_groups, dim=-1).indices
            keep = torch.zeros(T, r.expert_groups, dtype=torch.bool).scatter_(1, best, True)
            choice_TE = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, E)
        experts_TK = choice_TE.topk(r.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
    elif r.softmax_first:
        weights_TK, experts_TK = torch.softmax(logits_TE, dim=-1).topk(r.top_k, dim=-1)
    else:
        top_TK, experts_TK = logits_TE.topk(r.top_k, dim=-1)
        weights_TK = torch.softmax(top_TK, dim=-1)
    if r.renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK * r.routed_scale, experts_TK


def _canonical(weights_TK: Tensor, experts_TK: Tensor) -> tuple[Tensor, Tensor]:
    order = experts_TK.argsort(dim=-1)
    return weights_TK.double().gather(1, order), experts_TK.long().gather(1, order)


def _same(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> bool:
    (wa, ea), (wb, eb) = a, b
    return ea.shape == eb.shape and torch.equal(ea, eb) and torch.allclose(wa, wb, rtol=_RTOL, atol=_RTOL * 1e-2)
