"""Model-wide helpers over every MoE layer in a module tree."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moefx.layer.moe import MoE


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoE]]:
    """``(module path, layer)`` for every MoE in ``model``; a layer shared by several parents once."""
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            yield name, module


def is_expert_parallel(model: nn.Module) -> bool:
    """Whether ``moefx.parallelize`` sharded ``model``'s experts over a mesh (a dispatcher with a ``mesh``)."""
    return any(layer.dispatcher.mesh is not None for _, layer in moe_layers(model))


def is_offloaded(model: nn.Module) -> bool:
    """Whether ``moefx.offload`` made ``model``'s experts stream (it then holds only some of them)."""
    return any(not layer.experts.resident for _, layer in moe_layers(model))


def named_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer by name (non-persistent buffers too), tied ones once."""
    return [*model.named_parameters(), *model.named_buffers()]


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the router losses (load balance + z-loss, with their coefficients) of every MoE
    layer's last forward: a 0-dim tensor to add to the training loss before ``backward()``.

        loss = task_loss + moefx.aux_loss(model)

    Layers that have not run yet are skipped; with none, the result is a zero tensor. A layer
    called several times in one forward contributes its last call, and a layer skipped by the
    latest forward (LayerDrop, conditional blocks) still holds, and contributes, its previous
    call: models that skip layers should add each layer's ``aux_loss()`` where it runs.
    """
    losses = [layer.aux_loss() for _, layer in moe_layers(model) if layer._last_routing is not None]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return torch.stack(losses).sum()


def update_routing_bias(model: nn.Module) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing, for the layers with ``gate="sigmoid"`` and
    ``bias_update_rate > 0``: each expert's ``score_bias`` moves by ``bias_update_rate``, up if it
    got fewer choices than the mean expert of its layer in the training forwards since the last
    call, down if more. Call it after each optimizer step, on every rank: under torch.distributed
    the loads are first summed over all ranks (one all-reduce), so every rank applies one update."""
    routers = [layer.router for _, layer in moe_layers(model) if layer.config.bias_update_rate > 0]
    if not routers:
        return
    loads = [
        r.pending_load_E if r.pending_load_E is not None else r.score_bias.new_zeros(r.num_experts, dtype=torch.int64)
        for r in routers
    ]
    total = torch.cat(loads)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    with torch.no_grad():
        for router, load_E in zip(routers, total.split([r.num_experts for r in routers])):
            load_E = load_E.to(torch.float32)
            router.score_bias += router.bias_update_rate * torch.sign(load_E.mean() - load_E)
            router.pending_load_E = None


@dataclass(frozen=True)
class ParameterCounts:
    total: int  # every parameter once (shared and tied ones too)
    active_per_token: int  # what one token runs through: all but the routed experts it does not pick
    expert: int  # the parameters of one routed expert (the largest, when layers differ)


def parameter_counts(model: nn.Module) -> ParameterCounts:
    total = sum(p.numel() for p in model.parameters())
    idle, expert = 0, 0
    for _, layer in moe_layers(model):
        config = layer.config
        size = expert_size(layer)
        total += size * config.num_experts - sum(p.numel() for p in layer.experts.parameters(recurse=False))
        idle += size * (config.num_experts - config.top_k)
        expert = max(expert, size)
    return ParameterCounts(total, total - idle, expert)


def expert_size(layer: MoE) -> int:
    """Parameters of one of the layer's experts."""
    held = layer.experts.in_proj.shape[0]  # fewer than num_experts on an expert-parallel rank
    return sum(p.numel() for p in layer.experts.parameters(recurse=False)) // held
