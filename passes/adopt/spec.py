"""``AdoptedBlock``: an existing MoE block as moefx sees it (routing, expert weights, shared experts),
and the moefx ``MoE`` with the same math built from it.

Legend: D model dim, H expert hidden dim, E experts, K top-k.

Expert weights are kept in moefx's layout: ``in_proj [E, 2H, D]`` with the gate rows first (or
``[E, H, D]`` for plain experts), ``out_proj [E, D, H]``; a matcher converts the family's layout
(transposed, interleaved gate/up) into it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from moefx.layer.activations import ClampedSwiGLU
from moefx.layer.config import MoEConfig
from moefx.layer.moe import MoE, _exporting


@dataclass(frozen=True, kw_only=True)
class Routing:
    """How a block chooses and weighs its experts, in ``MoEConfig``'s terms."""

    gate: str  # "topk" (softmax) or "sigmoid" (DeepSeek-V3)
    top_k: int
    renormalize: bool
    softmax_first: bool | None = None  # topk only: softmax over all experts before top-k, or over the k after
    weight_ED: Tensor  # the router's weight
    bias_E: Tensor | None = None  # a learned logit bias (GPT-OSS)
    score_bias_E: Tensor | None = None  # sigmoid only: the choice's correction bias
    expert_groups: int = 1
    topk_groups: int | None = None
    routed_scale: float = 1.0


@dataclass(frozen=True, kw_only=True)
class SharedExperts:
    """Always-on experts: one dense FFN of ``in_proj [(2)H_shared, D]``, ``out_proj [D, H_shared]``."""

    in_proj: Tensor
    out_proj: Tensor
    gate_weight_1D: Tensor | None = None  # Qwen2-MoE: sigmoid(x · w) weighs the shared output


@dataclass(frozen=True, kw_only=True)
class AdoptedBlock:
    """One existing MoE block, ready to become a moefx ``MoE``."""

    path: str
    family: str  # what recognised it, in words (for the log and the record)
    routing: Routing
    in_proj: Tensor  # [E, (2)H, D], gate rows first when gated
    out_proj: Tensor  # [E, D, H]
    activation: str | nn.Module
    gated: bool
    in_bias: Tensor | None = None  # [E, (2)H]
    out_bias: Tensor | None = None  # [E, D]
    shared: SharedExperts | None = None
    load_balance_coef: float = 0.0  # the family's own auxiliary loss, in moefx's normalisation
    returns_router_scores: bool = False  # the block returns (output, router scores) (GPT-OSS)

    @property
    def num_experts(self) -> int:
        return self.in_proj.shape[0]

    @property
    def d_model(self) -> int:
        return self.in_proj.shape[2]

    @property
    def d_hidden(self) -> int:
        return self.out_proj.shape[2]

    def config(self) -> MoEConfig:
        """The layer's options (raises ``ValueError`` naming what moefx cannot express)."""
        r, shared = self.routing, self.shared
        num_shared = 0
        if shared is not None:
            width = shared.out_proj.shape[1]
            if width % self.d_hidden:
                raise ValueError(
                    f"its shared experts' hidden size {width} is not a multiple of the experts' {self.d_hidden}"
                )
            num_shared = width // self.d_hidden
        routing = {"renormalize": r.renormalize}
        if r.gate == "topk":
            routing["softmax_first"] = r.softmax_first
        else:
            routing.update(expert_groups=r.expert_groups, topk_groups=r.topk_groups)
        return MoEConfig(
            d_model=self.d_model, d_hidden=self.d_hidden, num_experts=self.num_experts, top_k=r.top_k,
            activation=self.activation, gated=self.gated, bias=self.in_bias is not None, gate=r.gate,
            load_balance_coef=self.load_balance_coef, z_loss_coef=0.0, routed_scale=r.routed_scale,
            num_shared_experts=num_shared, router_bias=r.bias_E is not None,
            shared_expert_gate=shared is not None and shared.gate_weight_1D is not None, **routing,
        )

    def build(self) -> MoE:
        """The moefx layer with this block's weights (same device and dtype). Expert stacks already in
        moefx's layout (Mixtral's, Qwen's: ``[E, 2H, D]`` gate rows first, ``[E, D, H]``) are shared with
        the block, not copied (the layer's fresh ``empty`` stacks are never written, so never paged in):
        adopting a model holds its experts once; others (transposed, interleaved) are copied."""
        first = self.in_proj
        layer_class = MoEWithRouterScores if self.returns_router_scores else MoE
        layer = layer_class(self.config(), device=first.device, dtype=first.dtype)
        with torch.no_grad():
            _copy(layer.router.weight, self.routing.weight_ED)
            _copy(layer.router.bias, self.routing.bias_E)
            if self.routing.score_bias_E is not None:
                layer.router.score_bias.copy_(self.routing.score_bias_E)
            for name in ("in_proj", "out_proj", "in_bias", "out_bias"):
                if _can_share(getattr(layer.experts, name), getattr(self, name)):  # the block's own storage, no copy
                    setattr(layer.experts, name, nn.Parameter(getattr(self, name)))
                else:
                    _copy(getattr(layer.experts, name), getattr(self, name))
            if self.shared is not None:
                _copy(layer.shared_experts.in_proj.weight, self.shared.in_proj)
                _copy(layer.shared_experts.out_proj.weight, self.shared.out_proj)
                _copy(None if layer.shared_gate is None else layer.shared_gate.weight, self.shared.gate_weight_1D)
        return layer


def _can_share(target: Tensor | None, source: Tensor | None) -> bool:
    return (target is not None and source is not None and target.shape == source.shape
            and target.dtype == source.dtype and target.device == source.device and source.is_contiguous())


def _copy(target: Tensor | None, source: Tensor | None) -> None:
    if target is None or source is None:
        if (target is None) != (source is None):
            raise ValueError("the moefx layer and the block disagree on which parameters exist")
        return
    if target.shape != source.shape:
        raise ValueError(f"shape {tuple(source.shape)} does not fit the moefx layer's {tuple(target.shape)}")
    target.copy_(source)


class MoEWithRouterScores(MoE):
    """An adopted block whose family returns ``(output, router scores)`` (GPT-OSS's MLP; its decoder
    layer keeps only the output): the scores are the last forward's combine weights ``[T, K]``, or
    None where the layer keeps no routing (under ``torch.export``)."""

    def forward(self, x: Tensor):
        out = super().forward(x)
        routing = None if _exporting() else self._last_routing
        return out, None if routing is None else routing.weights_TK.to(out.dtype)


def adopted_record(spec: AdoptedBlock, layer: MoE) -> dict:
    """What ``moefx.load`` needs to build the layer again: its config as JSON values."""
    config = asdict(layer.config)
    act = layer.config.activation
    if isinstance(act, ClampedSwiGLU):
        config["activation"] = {"clamped_swiglu": [act.alpha, act.limit]}
    return {"config": config, "returns_router_scores": spec.returns_router_scores}


def layer_from_record(record: dict, *, device=None, dtype=None) -> MoE:
    config = dict(record["config"])
    if isinstance(config["activation"], dict):
        config["activation"] = ClampedSwiGLU(*config["activation"]["clamped_swiglu"])
    layer_class = MoEWithRouterScores if record.get("returns_router_scores") else MoE
    return layer_class(MoEConfig(**config), device=device, dtype=dtype)
