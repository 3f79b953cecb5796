"""Expert parallelism: parallelize (sharding, hooks, DDP), the all-to-all dispatchers (plain; chunked,
two-level and shadowing), the distributed checkpoint."""

from moefx.parallel.shadowing import ShadowingCostModel

__all__ = ["ShadowingCostModel"]
