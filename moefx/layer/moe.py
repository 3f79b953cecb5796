"""``moefx.MoE``: a gated Mixture-of-Experts feed-forward layer built on moefx's custom ops.

Legend: T tokens, D model dim, H expert hidden dim, E experts, K top-k, S = T*K slots.

    x_TD ─▶ router ─▶ moefx::route ─▶ weights_TK, experts_TK
    x_TD, experts_TK ─▶ moefx::permute ─▶ x_SD (grouped by expert), offsets_E1
    x_SD ─▶ moefx::grouped_linear ─▶ act(gate)·up ─▶ moefx::grouped_linear ─▶ y_SD
    y_SD, weights_TK ─▶ moefx::unpermute ─▶ out_TD (+ shared experts)

Local experts run the same computation fused, with no ``[S, D]`` buffer: experts that read token
order (``Experts.reads_tokens``) behind a dispatcher that leaves rows in place
(``Dispatcher.fuses_experts``). The permuted path is for expert parallelism and offloaded experts:

    experts_TK ─▶ moefx::plan_dispatch ─▶ row_slot_S, offsets_E1
    x_TD ─▶ moefx::gather_grouped_linear ─▶ act(gate)·up ─▶ moefx::grouped_linear_combine(weights_TK) ─▶ out_TD

After each forward the layer keeps its routing (for ``aux_loss()``) and its token counts (for
``stats()``) as device tensors; nothing is copied to the host unless a caller asks.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moefx.layer.activations import make_activation
from moefx.layer.config import MoEConfig
from moefx.layer.dispatch import Dispatcher, ExchangeStats, LocalDispatcher
from moefx.layer.experts import DenseFFN, ExpertMid, Experts, GroupedExperts
from moefx.layer.losses import load_balance_loss, z_loss
from moefx.layer.routers import Routing, make_router


@dataclass(frozen=True)
class MoEStats:
    """Counts of the last forward, as device tensors (``.tolist()`` / ``int()`` syncs)."""

    tokens_per_expert: Tensor  # int64 [E]: choices each expert computed
    routed_per_expert: Tensor  # int64 [E]: choices routed to each expert before capacity
    dropped: Tensor  # int64 []: choices not computed (past capacity, or skipped by the router)
    exchange: ExchangeStats | None = None  # expert parallelism: bytes and messages sent, experts shadowed

    def as_dict(self) -> dict:
        """Plain Python numbers (one device-to-host copy)."""
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "routed_per_expert": self.routed_per_expert.tolist(),
            "dropped": int(self.dropped),
            **({"exchange": dataclasses.asdict(self.exchange)} if self.exchange is not None else {}),
        }


def _exporting() -> bool:
    """Whether torch.export is tracing. The flag export sets, read directly: before torch 2.13
    (2.11 checked), dynamo folds ``torch.compiler.is_exporting()`` to True under torch.compile too,
    so a compiled layer kept no routing and its aux loss was silently 0."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


class MoE(nn.Module):
    """Mixture-of-Experts FFN: input ``(..., d_model)`` (``(N, d_model, ...)`` with ``feature_axis=1``),
    output the same shape.

    Build it from options, ``MoE(d_model=512, d_hidden=1024, num_experts=8, top_k=2)`` (every
    ``MoEConfig`` field is a keyword), from a config, ``MoE(config)``, or from a dense FFN with
    ``MoE.from_ffn(template, num_experts=8, init="upcycle")``.
    """

    def __init__(
        self, config: MoEConfig | None = None, *, device=None, dtype=None, init_experts: bool = True, **options
    ) -> None:
        """``init_experts=False`` leaves the routed experts' weights uninitialised, for a caller that
        fills every one of them (``MoE.from_ffn``)."""
        super().__init__()
        if config is None:
            config = MoEConfig(**options)
        elif options:
            raise TypeError(f"MoE takes a config or keyword options, not both (got config and {sorted(options)})")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        activation = make_activation(config.activation)
        self.router = make_router(config, **factory)
        self.experts: Experts = GroupedExperts(
            config.d_model, config.d_hidden, config.num_experts, ExpertMid(activation, config.gated), config.bias,
            init=init_experts, **factory,
        )
        self.shared_experts = None
        if config.num_shared_experts:
            shared_mid = ExpertMid(copy.deepcopy(activation), config.gated)
            self.shared_experts = DenseFFN(
                config.d_model, config.num_shared_experts * config.d_hidden, shared_mid, config.bias, **factory
            )
        # Qwen2-MoE weighs its shared expert per token: sigmoid(x · w) (MoEConfig.shared_expert_gate).
        self.shared_gate = None
        if config.shared_expert_gate and self.shared_experts is not None:
            self.shared_gate = nn.Linear(config.d_model, 1, bias=False, **factory)
        self.dispatcher: Dispatcher = LocalDispatcher()
        # Experts that read token order run the fused ops when the dispatcher allows it (local
        # experts); False runs the permuted path instead (same results).
        self.fused_experts = True
        self._last_routing: Routing | None = None
        self._last_stats: MoEStats | None = None

    @classmethod
    def from_ffn(
        cls, template, *, num_experts: int, top_k: int = 2, init: str = "upcycle",
        drop_fraction: float = 0.5, split_by: str = "contiguous", device=None, dtype=None, **options,
    ) -> MoE:
        """An MoE whose experts are initialised from the dense FFN ``template`` (a ``moefx.FFNTemplate``)
        with strategy ``init`` (see ``moefx.init.strategies``); ``options`` are further ``MoEConfig``
        fields, and device and dtype default to the template's. A thin entry: the work is
        ``moefx.init.from_ffn.moe_from_ffn``."""
        # layering: the one upward import (MoE.from_ffn is the public entry to moefx.init)
        from moefx.init.from_ffn import moe_from_ffn

        return moe_from_ffn(
            template, num_experts=num_experts, top_k=top_k, init=init, drop_fraction=drop_fraction,
            split_by=split_by, device=device, dtype=dtype, layer_class=cls, **options,
        )

    def forward(self, x: Tensor) -> Tensor:
        D, axis = self.config.d_model, self.config.feature_axis
        if x.dim() <= max(axis, 0) or x.shape[axis] != D:
            where, layout = (
                ("last dimension", f"(..., {D})") if axis == -1 else ("dimension 1 (feature_axis=1)", f"(N, {D}, ...)")
            )
            raise ValueError(
                f"MoE(d_model={D}) got an input of shape {tuple(x.shape)}: its {where} must be {D}, i.e. shape {layout}"
            )
        if x.dtype != self.experts.dtype:
            raise ValueError(
                f"MoE got an input of dtype {x.dtype} but its weights are {self.experts.dtype}: "
                f"cast the input, or the layer with .to({x.dtype})"
            )
        if axis != -1:  # channels-first input (1x1 convolutions): route the feature vectors as rows
            return self._forward_rows(x.movedim(axis, -1)).movedim(-1, axis)
        return self._forward_rows(x)

    def _forward_rows(self, x: Tensor) -> Tensor:
        D = self.config.d_model
        x_TD = x.reshape(-1, D)
        routing = self.router(x_TD)
        capacity = self.config.capacity(x_TD.shape[0])
        weights_TK = routing.weights_TK
        if self.config.routed_scale != 1.0:
            weights_TK = weights_TK * self.config.routed_scale
        if self._experts_read_tokens():
            meta = self.dispatcher.plan(routing.experts_TK, self.config.num_experts, capacity)
            out_TD = self.experts.forward_tokens(x_TD, weights_TK, meta)
        else:
            out_TD, meta = self.dispatcher.run(
                self.experts, x_TD, routing.experts_TK, weights_TK, self.config.num_experts, capacity
            )
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD
        if not _exporting():  # an exported program has no module state to update
            self._last_routing = routing
            if self.training and self.config.bias_update_rate > 0:
                self.router.record_load(routing.counts_E)
            offsets_E1 = meta.permute_offsets_E1
            self._last_stats = MoEStats(
                tokens_per_expert=(offsets_E1[1:] - offsets_E1[:-1]).detach(),
                routed_per_expert=routing.counts_E.detach(),
                dropped=(meta.row_slot_S.shape[0] - offsets_E1[-1]).detach(),
                exchange=meta.exchange,
            )
        return out_TD.view(x.shape)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last forward's routing and counts: they hold autograd
        history, which ``copy.deepcopy`` refuses, and describe a forward the copy never ran."""
        state = dict(super().__getstate__())
        state["_last_routing"] = state["_last_stats"] = None
        return state

    def _experts_read_tokens(self) -> bool:
        """Whether to run the fused path (``forward_tokens``): a dispatcher that leaves rows in place
        (``fuses_experts``: experts local to this process) and experts that read token order
        (``reads_tokens``: stacked weights). Expert parallelism moves rows between ranks and
        offloaded experts stream one at a time, so both take the permuted path."""
        return self.fused_experts and self.dispatcher.fuses_experts and self.experts.reads_tokens

    def aux_loss(self) -> Tensor:
        """This layer's weighted router losses from its last forward (0-dim, differentiable)."""
        if self._last_routing is None:
            raise RuntimeError("MoE.aux_loss() needs a forward first: the losses come from the last forward's routing")
        logits_TE = self._last_routing.logits_TE
        loss = logits_TE.new_zeros(())
        if self.config.load_balance_coef:
            counts_E = self._last_routing.counts_E
            probs_TE = self.router.probabilities(logits_TE)
            loss = loss + self.config.load_balance_coef * load_balance_loss(probs_TE, counts_E, self.config.top_k)
        if self.config.z_loss_coef:
            loss = loss + self.config.z_loss_coef * z_loss(logits_TE)
        return loss

    def stats(self) -> MoEStats:
        """Token counts of the last forward (device tensors; no sync until read)."""
        if self._last_stats is None:
            raise RuntimeError("MoE.stats() needs a forward first")
        return self._last_stats

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d_model={c.d_model}, d_hidden={c.d_hidden}, num_experts={c.num_experts}, top_k={c.top_k}, "
            f"gate={c.gate!r}, capacity_factor={c.capacity_factor}"
        )
