"""Balanced k-means: N points into k clusters of exactly N/k points each.

``init="split"`` with ``split_by="kmeans"`` uses it to group an FFN's hidden neurons by their
input-projection rows, so that each expert holds neurons that respond to similar inputs
(MoEfication, Zhang et al. 2022). Plain k-means gives uneven clusters; experts need equal sizes.

Legend: N points, F features, C clusters.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def balanced_kmeans(points_NF: Tensor, num_clusters: int, *, iters: int = 20, seed: int = 0) -> Tensor:
    """The cluster (``0 <= c < num_clusters``) of each row of ``points_NF``; every cluster gets N/C rows.

    Deterministic for a given ``seed``. Distances are computed in fp32 (or fp64 for fp64 input).
    """
    N = points_NF.shape[0]
    if num_clusters < 1 or N % num_clusters:
        raise ValueError(f"balanced_kmeans needs num_clusters ({num_clusters}) to divide the number of points ({N})")
    points_NF = points_NF.float() if points_NF.dtype != torch.float64 else points_NF
    generator = torch.Generator().manual_seed(seed)
    first = torch.randperm(N, generator=generator)[:num_clusters].to(points_NF.device)
    centers_CF = points_NF[first].clone()
    norms_N1 = points_NF.square().sum(1, keepdim=True)  # one matmul per step instead of torch.cdist (slow for few C)
    labels_N = None
    for _ in range(iters):
        dist_NC = norms_N1 - 2 * points_NF @ centers_CF.T + centers_CF.square().sum(1)  # squared distances
        new_labels_N = _assign_with_capacity(dist_NC, N // num_clusters)
        if labels_N is not None and torch.equal(new_labels_N, labels_N):
            break
        labels_N = new_labels_N
        centers_CF.zero_().index_add_(0, labels_N, points_NF).div_(N // num_clusters)
    return labels_N


def _assign_with_capacity(dist_NC: Tensor, capacity: int) -> Tensor:
    """Each point to its nearest cluster that still has room; the closest proposers win a cluster.

    Rounds of proposals: each unassigned point proposes to its nearest cluster with room left, and
    each cluster keeps its closest proposers up to its room. At least one cluster fills per round,
    so there are at most C rounds, each a few vectorised sorts.
    """
    N, C = dist_NC.shape
    labels_N = torch.full((N,), -1, dtype=torch.long, device=dist_NC.device)
    room_C = torch.full((C,), capacity, dtype=torch.long, device=dist_NC.device)
    while (labels_N < 0).any():
        open_dist = dist_NC.masked_fill((room_C == 0)[None, :], float("inf"))
        free = (labels_N < 0).nonzero().squeeze(1)
        choice, dist = open_dist[free].argmin(1), open_dist[free].min(1).values
        order = torch.argsort(dist, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]  # by cluster, then by distance
        sorted_choice = choice[order]
        first_of_cluster = torch.searchsorted(sorted_choice, sorted_choice, right=False)
        rank = torch.arange(len(order), device=dist_NC.device) - first_of_cluster
        accepted = order[rank < room_C[sorted_choice]]
        labels_N[free[accepted]] = choice[accepted]
        room_C -= torch.bincount(choice[accepted], minlength=C)
    return labels_N
