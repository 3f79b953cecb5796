"""Per-layer random numbers: each MoE layer's random parts (its router's init, drop-upcycle's
re-drawn neurons) come from a generator seeded by the conversion's seed and the layer's path, so
a layer is built the same whether the whole model is converted in memory or one layer at a time
while streaming a checkpoint (``moefx.artifact.streaming``), and whatever was drawn before it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def layer_seed(seed: int, path: str) -> int:
    """A 63-bit seed from the conversion's ``seed`` and the layer's module ``path``."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextmanager
def seeded(seed: int, path: str, device: torch.device | str) -> Iterator[None]:
    """Draw from the layer's own generator inside; the global generators are as before afterwards."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(layer_seed(seed, path))
        if cuda:
            torch.cuda.manual_seed(layer_seed(seed, path))
        yield
