"""``MoEConfig``: every option of a moefx MoE layer, frozen and validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from moefx.activations import ACTIVATIONS

GATES = ("topk", "switch", "gshard", "noisy_topk")
# Switch Transformer's default multiplicative input jitter.
SWITCH_JITTER = 0.01


def _require(ok: bool, field: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"MoEConfig.{field}={value!r} is invalid: {allowed}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Options of one MoE layer.

    Routing: ``gate`` picks the router. ``topk`` is token-choice top-k over a softmax, with
    ``renormalize`` (divide the top-k weights by their sum) and ``softmax_first`` (softmax over all
    experts before top-k, or over the k chosen logits after it). ``switch`` is top-1 with input
    jitter (``router_jitter``, default 0.01 for switch, 0 otherwise), ``gshard`` top-2 with the
    second expert kept at random in training with probability 2·w2, ``noisy_topk`` adds learned
    Gaussian noise to the logits in training. ``capacity_factor=None`` is dropless; a number caps
    every expert at ``ceil(capacity_factor * tokens * top_k / num_experts)`` slots per forward.
    ``routed_scale`` multiplies the routed experts' combined output (the ``split`` init sets it
    to ``num_experts``). ``num_shared_experts`` adds always-on experts of ``d_hidden`` each.
    """

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int = 2
    activation: str | Callable = "silu"
    gated: bool = True
    bias: bool = False
    gate: str = "topk"
    renormalize: bool = True
    softmax_first: bool = True
    router_jitter: float | None = None
    capacity_factor: float | None = None
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    routed_scale: float = 1.0
    num_shared_experts: int = 0

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "num_experts"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, name, value, "must be an integer >= 1")
        _require(
            isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts,
            "top_k", self.top_k, f"must be an integer in [1, num_experts={self.num_experts}]",
        )
        _require(
            callable(self.activation) or self.activation in ACTIVATIONS,
            "activation", self.activation, f"must be one of {sorted(ACTIVATIONS)} or a row-wise callable",
        )
        _require(self.gate in GATES, "gate", self.gate, f"must be one of {list(GATES)}")
        if self.gate == "switch":
            _require(self.top_k == 1, "top_k", self.top_k, "must be 1 for gate='switch'")
        if self.gate == "gshard":
            _require(self.top_k == 2, "top_k", self.top_k, "must be 2 for gate='gshard'")
        if self.capacity_factor is not None:
            _require(
                isinstance(self.capacity_factor, (int, float)) and math.isfinite(self.capacity_factor)
                and self.capacity_factor > 0,
                "capacity_factor", self.capacity_factor, "must be None (dropless) or a number > 0",
            )
        if self.router_jitter is not None:
            _require(0 <= self.router_jitter < 1, "router_jitter", self.router_jitter, "must be in [0, 1)")
        for name in ("load_balance_coef", "z_loss_coef"):
            value = getattr(self, name)
            _require(value >= 0, name, value, "must be >= 0")
        _require(self.routed_scale > 0, "routed_scale", self.routed_scale, "must be > 0")
        _require(
            isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
            "num_shared_experts", self.num_shared_experts, "must be an integer >= 0",
        )

    @property
    def jitter(self) -> float:
        if self.router_jitter is not None:
            return self.router_jitter
        return SWITCH_JITTER if self.gate == "switch" else 0.0

    def capacity(self, num_tokens: int) -> int | None:
        """Slots each expert keeps per forward, or None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
