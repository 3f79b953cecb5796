"""Tile configurations of the Triton grouped GEMMs: candidates in named functions, the choice
cached per shape.

On a GPU, the first call for a shape times every candidate (one warm-up launch, which also
compiles it, then the median of a few batches of launches between CUDA events) and keeps the
fastest; a candidate that fails (a tile needing more shared memory than the GPU has) is passed
over. Later calls with that shape reuse the choice. A shape is the kernel, its flags, the
feature sizes, the dtype, the number of experts and the row count rounded up to a power of two
(token counts vary from step to step). Where nothing can be timed (the interpreter on CPU, or
while a CUDA graph is being captured) the first candidate, a rule of thumb for the shape, runs
untimed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TileConfig:
    BM: int
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3


def matmul_candidates(rows: int, out_features: int, in_features: int) -> tuple[TileConfig, ...]:
    """Tiles for ``segment_matmul``, the rule of thumb first: small row tiles waste less on the
    partial tile at each expert's end; wide ones reuse each loaded row more."""
    big = out_features >= 128 and in_features >= 64 and rows >= 1024
    first = TileConfig(64, 128, 64, 8) if big else TileConfig(32, 64, 32, 4)
    others = (
        TileConfig(64, 128, 64, 8), TileConfig(128, 128, 64, 8), TileConfig(64, 64, 64, 4, 4),
        TileConfig(128, 256, 64, 8), TileConfig(32, 64, 32, 4),
    )
    return (first, *(c for c in others if c != first))


def outer_candidates(rows: int, out_features: int, in_features: int) -> tuple[TileConfig, ...]:
    """Tiles for ``segment_outer``: BM x BN tile dW, BK is the chunk of rows per loop step."""
    big = out_features >= 128 and in_features >= 128
    first = TileConfig(64, 128, 64, 8) if big else TileConfig(32, 32, 32, 4)
    others = (TileConfig(64, 128, 64, 8), TileConfig(128, 128, 32, 8), TileConfig(64, 64, 64, 4), TileConfig(32, 32, 32, 4))
    return (first, *(c for c in others if c != first))


def cuda_milliseconds(launch: Callable[[], None], repeats: int = 5, min_batch_ms: float = 0.2) -> float:
    """Median milliseconds per ``launch()`` over ``repeats`` batches between CUDA events, after a
    warm-up call (which also compiles). A batch holds enough launches to last ``min_batch_ms``,
    so a microsecond kernel is not timed at the resolution of the events."""
    launch()
    batch = min(100, math.ceil(min_batch_ms / max(_batch_milliseconds(launch, 1), 1e-3)))
    return statistics.median(_batch_milliseconds(launch, batch) / batch for _ in range(repeats))


def _batch_milliseconds(launch: Callable[[], None], launches: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        launch()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class ConfigCache:
    """The chosen candidate per shape key (a ``TileConfig``, or any hashable choice such as a
    backend's name). ``measure`` times one candidate's launch."""

    def __init__(self, measure: Callable[[Callable[[], None]], float] = cuda_milliseconds) -> None:
        self.measure = measure
        self.chosen: dict[Hashable, Hashable] = {}

    def choose(
        self, key: Hashable, candidates: tuple, launch: Callable[[Any], object], timed: bool
    ) -> Any:
        """The configuration for ``key``; ``launch(config)`` runs the kernel with it (it must be
        safe to run repeatedly). Untimed, the first candidate is used and nothing is cached."""
        if key in self.chosen:
            return self.chosen[key]
        if not timed or len(candidates) == 1:
            return candidates[0]
        times, failures = [], []
        for config in candidates:
            try:
                times.append(self.measure(lambda c=config: launch(c)))
            except Exception as e:
                times.append(float("inf"))
                failures.append(e)
        if len(failures) == len(candidates):
            raise failures[0]
        self.chosen[key] = candidates[times.index(min(times))]
        return self.chosen[key]


def can_time(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def rows_bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


# One cache per process, shared by the kernels (a cache of measurements, not a setting).
TILES = ConfigCache()
