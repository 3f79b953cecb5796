"""``FFNTemplate``: a dense feed-forward block as the passes hand it to the runtime.

    plain:  out = down(act(up(x)))
    gated:  out = down(act(gate(x)) * up(x))

Weights are ``[out, in]`` like ``nn.Linear``. A fused gate-up projection is split into its halves
with ``from_fused_gate_up``. ``activation`` is any row-wise module or callable (or a registered
name); an MoE built from the template runs it once over all permuted rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from moefx.layer.activations import make_activation


@dataclass(frozen=True, kw_only=True)
class FFNTemplate:
    up_weight: Tensor  # [H, D]
    down_weight: Tensor  # [D, H]
    activation: nn.Module | Callable | str
    gate_weight: Tensor | None = None  # [H, D]: present for a gated FFN
    up_bias: Tensor | None = None  # [H]
    gate_bias: Tensor | None = None  # [H]
    down_bias: Tensor | None = None  # [D]

    def __post_init__(self) -> None:
        H, D = self.up_weight.shape
        expected = {
            "down_weight": (self.down_weight, (D, H)),
            "gate_weight": (self.gate_weight, (H, D)),
            "up_bias": (self.up_bias, (H,)),
            "gate_bias": (self.gate_bias, (H,)),
            "down_bias": (self.down_bias, (D,)),
        }
        for name, (tensor, shape) in expected.items():
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(
                    f"FFNTemplate.{name} has shape {tuple(tensor.shape)}, expected {shape} "
                    f"for up_weight of shape {(H, D)} (d_hidden={H}, d_model={D})"
                )
        if self.gate_bias is not None and self.gate_weight is None:
            raise ValueError("FFNTemplate.gate_bias is set but gate_weight is None: a gate bias needs a gate projection")

    @classmethod
    def from_linears(cls, up: nn.Linear, down: nn.Linear, activation, gate: nn.Linear | None = None) -> FFNTemplate:
        return cls(
            up_weight=up.weight, up_bias=up.bias, down_weight=down.weight, down_bias=down.bias,
            gate_weight=None if gate is None else gate.weight, gate_bias=None if gate is None else gate.bias,
            activation=activation,
        )

    @classmethod
    def from_fused_gate_up(
        cls, gate_up_weight: Tensor, down_weight: Tensor, activation, *, gate_first: bool = True,
        gate_up_bias: Tensor | None = None, down_bias: Tensor | None = None,
    ) -> FFNTemplate:
        """A single ``[2H, D]`` projection whose halves are the gate and the up projection."""
        if gate_up_weight.shape[0] % 2:
            raise ValueError(f"a fused gate-up weight needs an even number of rows, got shape {tuple(gate_up_weight.shape)}")
        first, second = gate_up_weight.chunk(2, dim=0)
        gate_w, up_w = (first, second) if gate_first else (second, first)
        gate_b = up_b = None
        if gate_up_bias is not None:
            b1, b2 = gate_up_bias.chunk(2)
            gate_b, up_b = (b1, b2) if gate_first else (b2, b1)
        return cls(
            up_weight=up_w, gate_weight=gate_w, down_weight=down_weight, activation=activation,
            up_bias=up_b, gate_bias=gate_b, down_bias=down_bias,
        )

    @property
    def d_model(self) -> int:
        return self.up_weight.shape[1]

    @property
    def d_hidden(self) -> int:
        return self.up_weight.shape[0]

    @property
    def gated(self) -> bool:
        return self.gate_weight is not None

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.up_bias, self.gate_bias, self.down_bias))

    def dense_forward(self, x: Tensor) -> Tensor:
        """The dense FFN itself: the reference a converted layer is checked against."""
        act = make_activation(self.activation)
        h = F.linear(x, self.up_weight, self.up_bias)
        h = act(F.linear(x, self.gate_weight, self.gate_bias)) * h if self.gated else act(h)
        return F.linear(h, self.down_weight, self.down_bias)
