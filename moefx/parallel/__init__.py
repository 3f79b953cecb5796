"""Expert parallelism: parallelize (sharding, hooks, DDP), the all-to-all dispatcher, the distributed checkpoint."""
