"""Routers: token-choice top-k (plain, Switch, GShard, noisy) on top of ``moefx::route``.

Legend: T tokens, D model dim, E experts, K top-k.

Router math runs in fp32 whatever the parameters' dtype: the input and weight are upcast before
the logits, and ``moefx::route`` keeps fp32. The weight is stored like an ``nn.Linear`` weight
(``[E, D]``, initialised the same way), in the layer's dtype so ``.to()`` treats it like any other.
A router may send a choice "nowhere" by setting its expert to E; permute then drops it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)
from moefx.config import MoEConfig
from moefx.kernels.dtypes import at_least_fp32


def _upcast(t: Tensor) -> Tensor:
    return t.to(at_least_fp32(t.dtype))


@dataclass(frozen=True)
class Routing:
    """What a router decided for one forward."""

    weights_TK: Tensor  # fp32 combine weights
    experts_TK: Tensor  # int64 in [0, E]; E means "not dispatched"
    counts_E: Tensor  # int64 choices per expert before capacity (for the balance loss and stats)
    logits_TE: Tensor  # fp32 logits the choice was made from (for the losses)


class TopKRouter(nn.Module):
    """Token-choice top-k over a softmax; the base of the other routers."""

    def __init__(self, config: MoEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.renormalize, self.softmax_first = config.renormalize, config.softmax_first
        self.jitter = config.jitter
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        """Logits from the input already upcast to at least fp32."""
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        return F.linear(x_TD, _upcast(self.weight))

    def select(self, routing: Routing) -> Routing:
        """Hook to change the choices after top-k (GShard's random routing)."""
        return routing

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.compute_logits(_upcast(x_TD))
        weights_TK, experts_TK, counts_E = torch.ops.moefx.route(
            logits_TE, self.top_k, self.renormalize, self.softmax_first
        )
        return self.select(Routing(weights_TK, experts_TK, counts_E, logits_TE))


class SwitchRouter(TopKRouter):
    """Switch Transformer: top-1, the weight is the softmax probability (``renormalize=False``),
    input jitter in training (``MoEConfig.router_jitter``)."""


class GShardRouter(TopKRouter):
    """GShard: top-2, renormalised; in training the second expert is dispatched with probability
    min(1, 2 * w2), where w2 is its renormalised weight, else it is skipped."""

    def select(self, routing: Routing) -> Routing:
        if not self.training:
            return routing
        second_w = routing.weights_TK[:, 1]
        skip = torch.rand_like(second_w) >= 2 * second_w
        experts_TK = routing.experts_TK.clone()
        experts_TK[:, 1] = torch.where(skip, self.num_experts, experts_TK[:, 1])
        return Routing(routing.weights_TK, experts_TK, routing.counts_E, routing.logits_TE)


class NoisyTopKRouter(TopKRouter):
    """Shazeer et al. 2017: logits + N(0, 1) * softplus(x W_noise) in training, softmax over the
    top-k (``softmax_first=False``)."""

    def __init__(self, config: MoEConfig, *, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        # Zero noise weights start the noise at softplus(0) = 0.69 for every expert.
        self.noise_weight = nn.Parameter(torch.zeros(config.num_experts, config.d_model, device=device, dtype=dtype))

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        logits_TE = super().compute_logits(x_TD)
        if not self.training:
            return logits_TE
        noise_std_TE = F.softplus(F.linear(x_TD, _upcast(self.noise_weight)))
        return logits_TE + torch.randn_like(logits_TE) * noise_std_TE


ROUTERS = {"topk": TopKRouter, "switch": SwitchRouter, "gshard": GShardRouter, "noisy_topk": NoisyTopKRouter}


def make_router(config: MoEConfig, *, device=None, dtype=None) -> TopKRouter:
    return ROUTERS[config.gate](config, device=device, dtype=dtype)
