"""Initialising an MoE's experts from the dense FFN it replaces.

- ``upcycle``: every expert is a copy of the FFN. The router keeps its random init: whichever
  experts a token picks, renormalised top-k weights sum to 1, so the output equals the FFN's.
- ``split``: the hidden neurons are shared out among the E experts, H/E each: in contiguous blocks
  (``split_by="contiguous"``), or grouped by balanced k-means over their input-projection rows
  (``split_by="kmeans"``: neurons that respond to similar inputs land in one expert). The router
  starts at zero, so every expert has probability 1/E, and ``routed_scale = E`` (set by
  ``MoE.from_ffn``) turns each weight back into 1; the down bias is shared out as ``b / E``.
  With ``top_k == num_experts`` the output equals the FFN's; with fewer, training breaks the ties.
- ``drop-upcycle``: upcycle, then re-draw a random ``drop_fraction`` of each expert's hidden
  neurons from a normal with the FFN weights' own mean and std (Drop-Upcycling, Nakamura 2025).
- ``random``: the layer's own initialisation; the FFN only fixes the shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.init.clustering import balanced_kmeans
from moefx.init.template import FFNTemplate

INIT_STRATEGIES = ("upcycle", "split", "drop-upcycle", "random")
SPLIT_METHODS = ("contiguous", "kmeans")


def _in_weight(template: FFNTemplate, rows: slice | Tensor) -> Tensor:
    """The expert's ``in_proj`` rows for hidden neurons ``rows``: gate rows first, then up rows."""
    up = template.up_weight[rows]
    return up if not template.gated else torch.cat([template.gate_weight[rows], up])


def _in_bias(template: FFNTemplate, rows: slice | Tensor) -> Tensor:
    up = template.up_weight.new_zeros(template.d_hidden) if template.up_bias is None else template.up_bias
    if not template.gated:
        return up[rows]
    gate = template.up_weight.new_zeros(template.d_hidden) if template.gate_bias is None else template.gate_bias
    return torch.cat([gate[rows], up[rows]])


@torch.no_grad()
def init_from_template(
    moe, template: FFNTemplate, strategy: str, *, drop_fraction: float = 0.5, split_by: str = "contiguous",
) -> None:
    """Fill ``moe``'s experts (and, for ``split``, its router) from ``template``."""
    if split_by not in SPLIT_METHODS:
        raise ValueError(f"split_by={split_by!r} is unknown: must be one of {list(SPLIT_METHODS)}")
    if strategy == "random":
        return
    experts, E = moe.experts, moe.config.num_experts
    if strategy == "split" and moe.config.routed_scale != E:
        raise ValueError(f"init='split' needs routed_scale={E} (num_experts), got {moe.config.routed_scale}")
    down_bias = template.down_bias
    if down_bias is None:
        down_bias = template.down_weight.new_zeros(template.d_model)
    neurons = _neurons_per_expert(template, E, split_by) if strategy == "split" else None
    # Every expert of an upcycle is the whole FFN: its gate and up rows are concatenated once, not per expert.
    whole = None if neurons is not None else (_in_weight(template, slice(None)),
                                              None if experts.in_bias is None else _in_bias(template, slice(None)))
    for e in range(E):
        rows = neurons[e] if neurons is not None else slice(None)
        experts.in_proj[e].copy_(_in_weight(template, rows) if whole is None else whole[0])
        experts.out_proj[e].copy_(template.down_weight[:, rows])
        if experts.in_bias is not None:
            experts.in_bias[e].copy_(_in_bias(template, rows) if whole is None else whole[1])
            experts.out_bias[e].copy_(down_bias / E if strategy == "split" else down_bias)
    if strategy == "split":
        moe.router.weight.zero_()
    elif strategy == "drop-upcycle":
        _redraw_neurons_(moe, template, drop_fraction)


def _neurons_per_expert(template: FFNTemplate, num_experts: int, split_by: str) -> list[slice | Tensor]:
    """The hidden neurons each expert gets under ``split``, in ascending order within an expert."""
    H = template.d_hidden // num_experts
    if split_by == "contiguous" or template.up_weight.is_meta:  # meta weights: nothing to cluster
        return [slice(e * H, (e + 1) * H) for e in range(num_experts)]
    rows = _in_weight(template, slice(None))  # gated: [gate rows; up rows], one feature vector per neuron
    features_NF = rows.reshape(-1, template.d_hidden, template.d_model).transpose(0, 1).flatten(1)
    features_NF = torch.nn.functional.normalize(features_NF.float(), dim=1)  # cluster by direction, not norm
    labels = balanced_kmeans(features_NF, num_experts)
    return [(labels == e).nonzero().squeeze(1) for e in range(num_experts)]


def _redraw_neurons_(moe, template: FFNTemplate, fraction: float) -> None:
    if not 0 <= fraction <= 1:
        raise ValueError(f"drop_fraction={fraction} must be in [0, 1]")
    experts, H = moe.experts, moe.config.d_hidden
    count = round(fraction * H)
    in_mean, in_std = template.up_weight.mean(), template.up_weight.std()
    out_mean, out_std = template.down_weight.mean(), template.down_weight.std()
    for e in range(moe.config.num_experts):
        neurons = torch.randperm(H, device=experts.in_proj.device)[:count]
        rows = torch.cat([neurons, neurons + H]) if template.gated else neurons
        experts.in_proj[e, rows] = torch.randn_like(experts.in_proj[e, rows]) * in_std + in_mean
        experts.out_proj[e][:, neurons] = torch.randn_like(experts.out_proj[e][:, neurons]) * out_std + out_mean
        if experts.in_bias is not None:
            experts.in_bias[e, rows] = 0
