"""Router losses: Switch/GShard load balancing and the ST-MoE z-loss. An empty batch gives 0.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balance_loss(probs_TE: Tensor, counts_E: Tensor, top_k: int) -> Tensor:
    """E * sum_e f_e * P_e: f_e the fraction of routed choices that went to expert e (no
    gradient), P_e the mean router probability of e (``probs_TE``: each token's distribution over
    the experts, from the router). Equals 1 when routing is uniform."""
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum()
    fraction_E = counts_E.to(probs_TE.dtype) / (num_tokens * top_k)
    return num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """mean_t logsumexp(logits_t)^2: keeps router logits small (ST-MoE)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum()
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
