"""Expert feed-forward blocks: the routed experts as stacked weights, and dense shared experts.

Legend: S permuted rows, D model dim, H expert hidden dim, E experts.

An expert is ``out_proj · mid(in_proj · x)``. ``mid`` is row-wise: for a gated expert
``act(gate) * up``, where ``in_proj`` holds the gate rows first and the up rows second, else
``act(h)``. Only the two linears are per expert (grouped linears); ``mid`` runs once over all rows.

``Experts`` is what the layer asks of its routed experts; another kind (``OffloadedExperts`` in
``moefx.offloading.experts`` streams its weights) is one module that has those members.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)
from moefx.layer.activations import computes_silu
from moefx.layer.dispatch import DispatchMeta

# The stacked [E, ...] expert tensors of GroupedExperts by name (the biases may be None); one
# expert is row e of each: the names expert parallelism shards and offloading streams.
EXPERT_PARAMETERS = ("in_proj", "out_proj", "in_bias", "out_bias")


class Experts(Protocol):
    """The routed experts of an ``MoE`` layer (``layer.experts``), as the layer calls them."""

    reads_tokens: bool  # has ``forward_tokens``: reads and writes token order itself (the fused path)
    resident: bool  # every expert's weights are held by the module (offloaded experts stream them in)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs must have."""
        ...

    def forward(self, x_SD: Tensor, offsets_E1: Tensor) -> Tensor:
        """Rows grouped by expert (expert e owns rows ``[offsets[e], offsets[e+1])``; rows past
        ``offsets[-1]`` are dropped and come back zero) to their outputs, ``[S, D]``."""
        ...

    def forward_tokens(self, x_TD: Tensor, weights_TK: Tensor, meta: DispatchMeta) -> Tensor:
        """Only when ``reads_tokens``: the weighted sum of each token's experts, ``[T, D]``, from
        ``x_TD`` and a dispatcher's ``plan`` (no row was moved)."""
        ...


def _init_linear_(weight: Tensor, bias: Tensor | None) -> None:
    """``nn.Linear``'s default init on ``[..., out, in]`` weights: U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1 / math.sqrt(weight.shape[-1])
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


class ExpertMid(nn.Module):
    """The row-wise part between an expert's two linears."""

    def __init__(self, activation: nn.Module, gated: bool) -> None:
        super().__init__()
        self.act, self.gated = activation, gated
        # A gated activation of its own (GPT-OSS's clamped SwiGLU) takes the gate and the up halves.
        self.pairwise = getattr(activation, "takes_gate_and_up", False)
        if self.pairwise and not gated:
            raise ValueError(f"{type(activation).__name__} combines a gate and an up projection: it needs gated=True")
        self.swiglu = gated and not self.pairwise and computes_silu(activation)

    def forward(self, h: Tensor) -> Tensor:
        if self.swiglu:
            return torch.ops.moefx.swiglu(h)  # the same math, without a copy in the backward
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.act(gate, up) if self.pairwise else self.act(gate) * up
        return self.act(h)


class GroupedExperts(nn.Module):
    """E experts in ``in_proj [E, (2)H, D]``, ``out_proj [E, D, H]`` and optional biases
    (``EXPERT_PARAMETERS``); an ``Experts``."""

    reads_tokens = True  # forward_tokens: the gather and the combine fused into the linears
    resident = True

    def __init__(
        self, d_model: int, d_hidden: int, num_experts: int, mid: ExpertMid, bias: bool, *, device=None, dtype=None,
        init: bool = True,
    ) -> None:
        """``init=False`` leaves the weights uninitialised, for a caller that fills every one of them."""
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        width = 2 * d_hidden if mid.gated else d_hidden
        self.mid = mid
        self.in_proj = nn.Parameter(torch.empty(num_experts, width, d_model, **factory))
        self.out_proj = nn.Parameter(torch.empty(num_experts, d_model, d_hidden, **factory))
        self.in_bias = nn.Parameter(torch.empty(num_experts, width, **factory)) if bias else None
        self.out_bias = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if bias else None
        if init:
            self.reset_parameters()

    @property
    def dtype(self) -> torch.dtype:
        return self.in_proj.dtype

    def reset_parameters(self) -> None:
        _init_linear_(self.in_proj, self.in_bias)
        _init_linear_(self.out_proj, self.out_bias)

    def forward(self, x_SD: Tensor, offsets_E1: Tensor) -> Tensor:
        h_SH = torch.ops.moefx.grouped_linear(x_SD, self.in_proj, self.in_bias, offsets_E1)
        return torch.ops.moefx.grouped_linear(self.mid(h_SH), self.out_proj, self.out_bias, offsets_E1)

    def forward_tokens(self, x_TD: Tensor, weights_TK: Tensor, meta: DispatchMeta) -> Tensor:
        """The experts' weighted sum per token, read from and written to token order: the gather is
        fused into the first linear and the combine into the second, so no ``[T*K, D]`` copy exists."""
        offsets_E1, row_slot_S = meta.offsets_E1, meta.row_slot_S
        h_SH = torch.ops.moefx.gather_grouped_linear(
            x_TD, self.in_proj, self.in_bias, offsets_E1, row_slot_S, meta.slot_row_S
        )
        return torch.ops.moefx.grouped_linear_combine(
            self.mid(h_SH), self.out_proj, self.out_bias, offsets_E1, row_slot_S, weights_TK
        )


class DenseFFN(nn.Module):
    """A plain FFN of the same form as the experts; the always-on shared experts."""

    def __init__(self, d_model: int, d_hidden: int, mid: ExpertMid, bias: bool, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(d_model, 2 * d_hidden if mid.gated else d_hidden, bias=bias, **factory)
        self.mid = mid
        self.out_proj = nn.Linear(d_hidden, d_model, bias=bias, **factory)

    def forward(self, x_TD: Tensor) -> Tensor:
        return self.out_proj(self.mid(self.in_proj(x_TD)))
