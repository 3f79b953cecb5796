"""The process groups of the expert-parallel exchange: the EP group, and for a two-level exchange
(``ranks_per_node=R``) the node group (the R ranks of this rank's node) and the lane group (the
ranks of the same local index on every node). ``exchange_plan`` says what travels in each.

EP ranks ``[n*R, (n+1)*R)`` are taken to share node n (torchrun numbers the ranks of a node
consecutively, and ``expert_parallel_mesh`` lays ``ep`` out along them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class ExchangeGroups:
    ep: dist.ProcessGroup
    ranks_per_node: int | None = None
    node: dist.ProcessGroup | None = None  # EP ranks [n*R, (n+1)*R) of this rank's node n
    lane: dist.ProcessGroup | None = None  # EP ranks i, R+i, 2R+i, ... (i: this rank's index in its node)


def check_ranks_per_node(ranks_per_node, ep_size: int) -> None:
    if ranks_per_node is None:
        return
    if not isinstance(ranks_per_node, int) or isinstance(ranks_per_node, bool) or ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be a positive integer (the EP ranks sharing a node), got {ranks_per_node!r}")
    if ep_size % ranks_per_node:
        divisors = [d for d in range(1, ep_size + 1) if ep_size % d == 0]
        raise ValueError(
            f"ranks_per_node={ranks_per_node} does not divide the EP size {ep_size}: the EP group must be whole nodes; "
            f"choose one of {divisors} (usually the GPUs per node), or None for a flat exchange"
        )


def exchange_groups(mesh: DeviceMesh, ranks_per_node: int | None) -> ExchangeGroups:
    """The groups of this rank. Every rank must call it (``new_group`` is collective): it creates
    the node and lane groups of every EP group of the ``(dp, ep)`` mesh, in one order."""
    ep_group = mesh["ep"].get_group()
    if ranks_per_node is None:
        return ExchangeGroups(ep_group)
    ep_size, R = mesh["ep"].size(), ranks_per_node
    check_ranks_per_node(R, ep_size)
    me = dist.get_rank()
    node = lane = None
    for row in mesh.mesh.reshape(-1, ep_size).tolist():  # each EP group's global ranks, by EP index
        for n in range(ep_size // R):
            group = dist.new_group(row[n * R : (n + 1) * R])
            node = group if me in row[n * R : (n + 1) * R] else node
        for i in range(R):
            group = dist.new_group(row[i::R])
            lane = group if me in row[i::R] else lane
    return ExchangeGroups(ep_group, R, node, lane)
