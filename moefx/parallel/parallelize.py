"""Expert parallelism: ``moefx.parallelize(model, mesh)`` shards every MoE layer's experts over the
mesh's ``ep`` dimension and replaces its dispatcher with the all-to-all one.

The mesh is ``(dp, ep)`` (``expert_parallel_mesh`` builds it): the ``ep`` ranks of one row
exchange tokens and together hold all E experts, E/ep each; the ``dp`` ranks of one column hold
the same experts. Gradients, for the average of every rank's loss (what DDP gives the rest):

- non-expert parameters (router, attention, norms, ...) are replicated: DDP over all ranks
  averages them. ``parallelize`` wraps the model in DDP, with the expert parameters left out,
  unless ``data_parallel=False`` (then bring your own, e.g. FSDP2's ``fully_shard`` over the
  world for the rest, with ``ignored_params=expert_parameters(model)``; examples/train_ep.py
  ``--fsdp`` does it, and its losses equal DDP's).
- expert parameters: rank (d, j) holds experts of column j; its backward already sums the
  gradient from the tokens of every rank of row d (they came through the all-to-all). A hook on
  each expert parameter sums that over the ``dp`` ranks and divides by the world size.
"""

from __future__ import annotations

from itertools import zip_longest

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from moefx.layer.experts import EXPERT_PARAMETERS
from moefx.layer.moe import MoE
from moefx.model import moe_layers
from moefx.parallel.all_to_all_dispatcher import AllToAllDispatcher
from moefx.parallel.hierarchical import check_ranks_per_node, exchange_groups
from moefx.parallel.scheduled_dispatcher import ScheduledDispatcher
from moefx.parallel.shadowing import ShadowingCostModel, as_cost_model


def expert_parallel_mesh(ep_size: int, dp_size: int | None = None, device_type: str | None = None) -> DeviceMesh:
    """A ``(dp, ep)`` mesh over the default process group; ``dp_size`` defaults to world / ep."""
    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    dp_size = world // ep_size if dp_size is None else dp_size
    if dp_size * ep_size != world:
        raise ValueError(f"dp_size={dp_size} x ep_size={ep_size} = {dp_size * ep_size}, not the world size {world}")
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    return init_device_mesh(device_type, (dp_size, ep_size), mesh_dim_names=("dp", "ep"))


def parallelize(model: nn.Module, mesh: DeviceMesh, *, data_parallel: bool = True, overlap_chunks: int = 1,
                ranks_per_node: int | None = None, shadowing: bool | ShadowingCostModel = False) -> nn.Module:
    """Shard ``model``'s experts over ``mesh["ep"]`` in place; returns the model, in DDP when
    ``data_parallel`` and there is more than one rank. Every rank must call it, with the same options.

    ``overlap_chunks=N``: each layer exchanges and computes its rows in N chunks, the all-to-all of
    one chunk running while the experts compute another (forward and backward).
    ``ranks_per_node=R`` (R divides the EP size): a two-level exchange, within the node then one
    message per other node (EP/R-1 instead of EP-1 inter-node messages per rank).
    ``shadowing=True`` (or a ``ShadowingCostModel``): each step, experts whose rows cost more to
    move and compute on one rank than their weights cost to broadcast are replicated to every EP
    rank for that step (``layer.stats().exchange`` says which, and the bytes saved). Dropless mode
    only: with a capacity (``capacity_factor``, and always with gate="expert_choice") every expert
    gets C rows from every rank, equal loads, so shadowing is a no-op there (see ``shadowing.py``).
    These run eagerly; see ``scheduled_dispatcher.py`` for the schedule.
    """
    if not dist.is_initialized():
        raise RuntimeError("moefx.parallelize needs torch.distributed: launch with torchrun and call "
                           "torch.distributed.init_process_group() first")
    names = mesh.mesh_dim_names or ()
    if "ep" not in names or not set(names) <= {"dp", "ep"}:
        raise ValueError(
            f"the mesh's dimensions must be 'ep' and optionally 'dp' (it has {names}); build it with "
            "moefx.expert_parallel_mesh"
        )
    world = dist.get_world_size()
    if mesh.size() != world:
        raise ValueError(f"the mesh has {mesh.size()} ranks but the world has {world}: it must span every rank")
    layers = list(moe_layers(model))
    options = (overlap_chunks, ranks_per_node, repr(shadowing))
    _check_same_on_every_rank(model, layers, mesh, options)  # a collective: past it, every rank decides alike
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer to parallelize: convert it with moefx.moefy first")
    ep_mesh = mesh["ep"]
    ep_size, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    if not isinstance(overlap_chunks, int) or isinstance(overlap_chunks, bool) or overlap_chunks < 1:
        raise ValueError(f"overlap_chunks must be a positive integer (1: no overlap), got {overlap_chunks!r}")
    check_ranks_per_node(ranks_per_node, ep_size)
    cost_model = as_cost_model(shadowing)
    for path, layer in layers:
        if layer.dispatcher.mesh is not None:
            raise ValueError(f"{path} is already expert-parallel: call moefx.parallelize once")
        if layer.config.num_experts % ep_size:
            raise ValueError(
                f"{path} has num_experts={layer.config.num_experts}, which the EP size {ep_size} does not divide: "
                f"choose an ep_size among the divisors of {layer.config.num_experts}"
            )
        if cost_model is not None and not all(hasattr(layer.experts, name) for name in EXPERT_PARAMETERS):
            raise ValueError(f"shadowing replicates stacked expert weights, which {path}'s "
                             f"{type(layer.experts).__name__} does not hold: use shadowing=False for it")
    scheduled = overlap_chunks > 1 or ranks_per_node is not None or cost_model is not None
    groups = exchange_groups(mesh, ranks_per_node) if scheduled and ep_size > 1 else None
    dp_group = mesh["dp"].get_group() if "dp" in names and mesh["dp"].size() > 1 else None
    for _, layer in layers:
        if ep_size > 1:
            _keep_local_experts(layer, ep_rank, ep_size)
            gate = layer.config.gate
            layer.dispatcher = (
                ScheduledDispatcher(mesh, layer.config.num_experts, overlap_chunks=overlap_chunks, groups=groups,
                                    cost_model=cost_model, gate=gate)
                if scheduled else AllToAllDispatcher(mesh, layer.config.num_experts, gate=gate)
            )
        for name in EXPERT_PARAMETERS:
            param = getattr(layer.experts, name)
            if param is not None and param.requires_grad:
                param.register_hook(_expert_gradient_hook(world, dp_group))
    if not data_parallel or world == 1:
        return model
    expert_names = [f"{path}.experts.{name}" for path, layer in layers for name in EXPERT_PARAMETERS
                    if getattr(layer.experts, name) is not None]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Every MoE layer's expert weights: after ``parallelize`` they are sharded over ``ep`` and
    their gradients synchronised by its hooks, so a data-parallel wrapper must leave them out
    (FSDP2: ``fully_shard(block, mesh=world_mesh, ignored_params=expert_parameters(model))``)."""
    return {param for _, layer in moe_layers(model) for name in EXPERT_PARAMETERS
            if (param := getattr(layer.experts, name)) is not None}


def _keep_local_experts(layer: MoE, ep_rank: int, ep_size: int) -> None:
    local = layer.config.num_experts // ep_size
    lo, hi = ep_rank * local, (ep_rank + 1) * local
    for name in EXPERT_PARAMETERS:
        param = getattr(layer.experts, name)
        if param is not None:
            setattr(layer.experts, name, nn.Parameter(param.detach()[lo:hi].clone(), requires_grad=param.requires_grad))


def _expert_gradient_hook(world: int, dp_group):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if dp_group is not None:
            grad = grad.clone()
            dist.all_reduce(grad, group=dp_group)
        return grad / world
    return hook


def _check_same_on_every_rank(model: nn.Module, layers, mesh: DeviceMesh, options: tuple) -> None:
    """Ranks whose models or meshes differ would deadlock in the first all-to-all: compare them
    first (one all_gather_object) and raise on every rank, naming the difference."""
    mine = {
        "mesh": (tuple(mesh.mesh.shape), mesh.mesh_dim_names),
        "options": options,
        "layers": [
            (path, layer.config.num_experts, layer.config.top_k, layer.config.d_model, layer.config.d_hidden,
             layer.config.capacity_factor, layer.config.gate)
            for path, layer in layers
        ],
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    first = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs["mesh"] != first["mesh"]:
            raise ValueError(
                f"ranks differ in their device mesh: rank {rank} has (shape, names) {theirs['mesh']} where rank 0 has "
                f"{first['mesh']}; build the same mesh on every rank"
            )
        if theirs["options"] != first["options"]:
            raise ValueError(
                f"ranks differ in parallelize's options (overlap_chunks, ranks_per_node, shadowing): rank {rank} has "
                f"{theirs['options']} where rank 0 has {first['options']}; pass the same options on every rank"
            )
        difference = next(((a, b) for a, b in zip_longest(theirs["layers"], first["layers"]) if a != b), None)
        if difference is not None:
            raise ValueError(
                f"ranks differ in their MoE layers (path, num_experts, top_k, d_model, d_hidden, capacity_factor, "
                f"gate): rank {rank} has {difference[0]} where rank 0 has {difference[1]}; every rank must convert the "
                "same model with the same options"
            )
