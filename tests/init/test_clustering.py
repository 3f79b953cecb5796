"""Balanced k-means: equal cluster sizes, and it finds clusters that are plainly there."""

import pytest
import torch

from moefx.init.clustering import balanced_kmeans


def _blobs(num_clusters, per_cluster, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_clusters, dim, generator=g) * 10
    points = centers.repeat_interleave(per_cluster, 0) + torch.randn(num_clusters * per_cluster, dim, generator=g) * 0.1
    truth = torch.arange(num_clusters).repeat_interleave(per_cluster)
    shuffle = torch.randperm(len(points), generator=g)
    return points[shuffle], truth[shuffle]


@pytest.mark.parametrize("num_clusters,per_cluster", [(2, 5), (4, 8), (8, 3), (1, 7)])
def test_every_cluster_gets_the_same_number_of_points(num_clusters, per_cluster):
    points = torch.randn(num_clusters * per_cluster, 5)  # no structure: sizes must still be equal
    labels = balanced_kmeans(points, num_clusters)
    assert torch.bincount(labels, minlength=num_clusters).tolist() == [per_cluster] * num_clusters


def test_separated_blobs_are_recovered_exactly():
    points, truth = _blobs(num_clusters=4, per_cluster=16)
    labels = balanced_kmeans(points, 4)
    # the same partition, whatever the cluster numbering: each found cluster is one true blob
    for c in range(4):
        assert len(set(truth[labels == c].tolist())) == 1


def test_same_seed_same_labels():
    points = torch.randn(24, 3)
    assert torch.equal(balanced_kmeans(points, 4, seed=3), balanced_kmeans(points, 4, seed=3))


def test_cluster_count_must_divide_the_points():
    with pytest.raises(ValueError, match=r"num_clusters \(5\) to divide the number of points \(12\)"):
        balanced_kmeans(torch.randn(12, 2), 5)
