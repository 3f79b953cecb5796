"""Routers: token-choice top-k (plain, Switch, GShard, noisy) on top of ``moefx::route``, and
DeepSeek-V3's sigmoid router with group-limited choice and a balancing bias, and expert choice.

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
from moefx.kernels.ops.dtypes import at_least_fp32
from moefx.kernels.ops.route import count_choices
from moefx.layer.config import MoEConfig


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
        self.bias = None  # MoEConfig.router_bias: a learned logit bias (GPT-OSS's router has one)
        if config.router_bias:
            self.bias = nn.Parameter(torch.zeros(config.num_experts, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def compute_logits(self, x_TD: Tensor) -> Tensor:
        """Logits from the input already upcast to at least fp32."""
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        return F.linear(x_TD, _upcast(self.weight), None if self.bias is None else _upcast(self.bias))

    def select(self, routing: Routing) -> Routing:
        """Hook to change the choices after top-k (GShard's random routing)."""
        return routing

    def probabilities(self, logits_TE: Tensor) -> Tensor:
        """Each token's distribution over the experts, for the load-balance loss."""
        return torch.softmax(logits_TE, dim=-1)

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


class SigmoidRouter(TopKRouter):
    """DeepSeek-V3: scores ``sigmoid(logits)``; each token picks its k experts by ``score +
    score_bias`` among the ``topk_groups`` expert groups whose two best biased scores sum highest,
    and weighs them by their plain scores (renormalised unless ``renormalize=False``).

    ``score_bias`` (a buffer, saved with the model) only steers the choice: it gets no gradient.
    ``moefx.update_routing_bias`` moves it against the load counted here since its last call
    (auxiliary-loss-free balancing), so overloaded experts get chosen less."""

    def __init__(self, config: MoEConfig, *, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        self.groups, self.topk_groups = config.expert_groups, config.topk_groups
        self.bias_update_rate = config.bias_update_rate
        self.register_buffer("score_bias", torch.zeros(config.num_experts, device=device, dtype=torch.float32))
        self.pending_load_E: Tensor | None = None  # choices per expert since the last bias update

    def _apply(self, fn, recurse=True):
        """``score_bias`` stays fp32 through ``.to(dtype)``/``.half()``: in bf16, a balancing step of
        0.001 beside a bias of 0.25 rounds away, and the balancing would silently stop."""
        bias = self.score_bias
        super()._apply(fn, recurse)
        moved = self.score_bias
        if moved.dtype != torch.float32:
            self.score_bias = moved.float() if bias.is_meta or moved.is_meta else bias.to(moved.device)
        if self.pending_load_E is not None:  # counts (int64) move with the layer, so an update can sum them
            self.pending_load_E = self.pending_load_E.to(moved.device)
        return self

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.compute_logits(_upcast(x_TD))
        scores_TE = torch.sigmoid(logits_TE)
        choice_TE = scores_TE + self.score_bias
        if self.topk_groups < self.groups:
            choice_TE = self._keep_best_groups(choice_TE)
        experts_TK = torch.topk(choice_TE, self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return Routing(weights_TK, experts_TK, count_choices(experts_TK, self.num_experts), logits_TE)

    def _keep_best_groups(self, choice_TE: Tensor) -> Tensor:
        """-inf outside each token's ``topk_groups`` best groups (a group's worth: its top-2 sum)."""
        T, E = choice_TE.shape
        grouped_TGE = choice_TE.view(T, self.groups, E // self.groups)
        worth_TG = grouped_TGE.topk(min(2, E // self.groups), dim=-1).values.sum(dim=-1)
        best_TG = torch.topk(worth_TG, self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(worth_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        return grouped_TGE.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)

    def probabilities(self, logits_TE: Tensor) -> Tensor:
        """Scores normalised per token (DeepSeek-V3's balance loss)."""
        scores_TE = torch.sigmoid(logits_TE)
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    def record_load(self, counts_E: Tensor) -> None:
        """Adds a training forward's choices to the load the next bias update reads."""
        counts_E = counts_E.detach()
        self.pending_load_E = counts_E if self.pending_load_E is None else self.pending_load_E + counts_E


class ExpertChoiceRouter(TopKRouter):
    """Zhou et al. 2022: scores are the softmax over experts; each expert takes the C tokens of the
    batch that score highest for it, C = ``config.capacity(T)`` = ceil(capacity_factor * T * top_k / E)
    (at most T), weighted by that score. A token may be taken by 0..E experts.

    The choice is written as token-choice routing with K = E slots per token: slot e of token t is
    expert e when e took t, else E ("not dispatched"), so every dispatcher (local, expert-parallel)
    runs it unchanged, and each expert gets exactly C rows, which its capacity C keeps.

    It ranks the tokens of the whole batch (on each rank, that rank's batch), so a token's output
    depends on other tokens, later ones included: for encoders and training, not causal models or
    autoregressive decoding (``refuse_expert_choice`` stops moefy on a model that generates)."""

    def __init__(self, config: MoEConfig, *, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        self.capacity = config.capacity  # C for T tokens; the config resolves capacity_factor (default 1.0)

    def forward(self, x_TD: Tensor) -> Routing:
        logits_TE = self.compute_logits(_upcast(x_TD))
        scores_TE = torch.softmax(logits_TE, dim=-1)
        T, E = scores_TE.shape
        C = min(self.capacity(T), T)
        chosen_EC = torch.topk(scores_TE.t(), C, dim=-1).indices
        taken_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
        taken_TE[chosen_EC, torch.arange(E, device=x_TD.device).unsqueeze(1)] = True
        expert_ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        experts_TE = torch.where(taken_TE, expert_ids_TE, E)
        weights_TE = torch.where(taken_TE, scores_TE, 0.0)
        counts_E = taken_TE.sum(dim=0)
        return Routing(weights_TE, experts_TE, counts_E, logits_TE)


def refuse_expert_choice(model: nn.Module, gate: str) -> None:
    """gate='expert_choice' ranks each expert's tokens over the whole batch, later tokens included:
    refused on a causal model (a module with ``is_causal = True``, as transformers' causal attention
    has) and on one that generates (``generate``, ``can_generate()``, a decoder config)."""
    if gate != "expert_choice":
        return
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    causal = next((type(m).__name__ for m in model.modules() if getattr(m, "is_causal", None) is True), None)
    generates = (
        (callable(can_generate) and can_generate())
        or (can_generate is None and callable(getattr(model, "generate", None)))
        or getattr(config, "is_decoder", False) is True
    )
    if causal or generates:
        why = f"its {causal} is causal" if causal else "it generates"
        raise ValueError(
            f"gate='expert_choice' cannot convert {type(model).__name__}: {why}, and expert choice picks each "
            "expert's tokens over the whole batch, later tokens included, so it is not causal and cannot decode one "
            "token at a time. Use it for encoders (BERT, ViT) in training; for a causal model pick a token-choice "
            "gate (topk, switch, gshard, noisy_topk, sigmoid)"
        )


ROUTERS = {
    "topk": TopKRouter, "switch": SwitchRouter, "gshard": GShardRouter, "noisy_topk": NoisyTopKRouter,
    "sigmoid": SigmoidRouter, "expert_choice": ExpertChoiceRouter,
}


def make_router(config: MoEConfig, *, device=None, dtype=None) -> TopKRouter:
    return ROUTERS[config.gate](config, device=device, dtype=dtype)
