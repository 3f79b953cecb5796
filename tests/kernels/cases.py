"""Routing cases shared by the op tests: odd sizes, several k, and the awkward distributions."""

from __future__ import annotations

import torch

# (name, tokens, experts, top_k)
SIZES = [("odd", 7, 5, 1), ("odd", 13, 6, 2), ("odd", 9, 7, 4), ("one-token", 1, 4, 2), ("k=E", 5, 4, 4)]


def choices(kind: str, tokens: int, experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    """``experts_TK`` (int64, distinct per token) for a named distribution."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k]
    if kind == "zero-token-experts":  # the upper half of the experts get nothing
        allowed = max(top_k, experts // 2)
        return torch.rand(tokens, allowed, generator=g).argsort(dim=1)[:, :top_k]
    if kind == "all-to-one":  # every token's first choice is expert 0
        rest = torch.rand(tokens, experts - 1, generator=g).argsort(dim=1)[:, : top_k - 1] + 1
        return torch.cat([torch.zeros(tokens, 1, dtype=torch.long), rest], dim=1)
    raise ValueError(kind)


KINDS = ["random", "zero-token-experts", "all-to-one"]


def all_cases():
    """(id, tokens, experts, top_k, kind) over every size and distribution."""
    for name, T, E, K in SIZES:
        for kind in KINDS:
            yield pytest_id(name, T, E, K, kind), T, E, K, kind


def pytest_id(name, T, E, K, kind) -> str:
    return f"{name}-T{T}-E{E}-K{K}-{kind}"
