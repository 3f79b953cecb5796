"""The Triton grouped linear (forward, dX, dW, db) against the slow reference loop, over odd
sizes, experts with zero rows, dropped rows, and tiles that straddle experts."""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'moefx[triton]')")

from moefx.kernels import reference  # noqa: E402
from moefx.kernels.triton.grouped_linear import (  # noqa: E402
    grouped_linear_backward,
    grouped_linear_forward,
    row_tiles_bound,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Rows per expert, then dropped rows at the end. Sizes cross the 32- and 64-row tiles.
SEGMENTS = {
    "uneven": ([37, 1, 70], 0),
    "zero-row-experts": ([0, 33, 0, 5, 0], 0),
    "all-to-one": ([90, 0, 0, 0], 0),
    "dropped-tail": ([20, 0, 45], 29),
    "all-dropped": ([0, 0], 17),
    "many-small": ([3, 0, 2, 7, 1, 0, 0, 4, 9, 5], 2),
    # more row tiles than one launch-order group holds (GROUP_M), the last group partial
    "many-row-tiles": ([150, 0, 213, 77, 1], 40),
    # every segment ends in a partial 32-row tile, the dropped rows too: 10 row tiles, exactly the
    # grid's bound cdiv(S, 32) + E, so a launch one row tile short leaves rows unwritten
    "every-tile-partial": ([33, 33, 33, 65], 1),
}


def _case(name: str, bias: bool, dtype: torch.dtype, I: int = 40, O: int = 72):
    sizes, dropped = SEGMENTS[name]
    g = torch.Generator().manual_seed(0)
    S, E = sum(sizes) + dropped, len(sizes)
    x = torch.randn(S, I, generator=g, dtype=torch.float64)
    w = torch.randn(E, O, I, generator=g, dtype=torch.float64)
    b = torch.randn(E, O, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(S, O, generator=g, dtype=torch.float64)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    return x, w, b, dy, offsets


def _on(t, dtype):
    return None if t is None else t.to(DEVICE, dtype)


TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=2e-2)}


@pytest.mark.parametrize("name", SEGMENTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_backward_match_the_reference(name, bias, dtype):
    x, w, b, dy, offsets = _case(name, bias, dtype)
    # The reference in float64, with autograd for every gradient.
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if bias else None
    want = reference.grouped_linear(xr, wr, br, offsets.tolist())
    touch = xr.sum() + wr.sum() + (br.sum() if bias else 0)  # zero gradients even when every row is dropped
    (want * dy).sum().add(0 * touch).backward()

    got = grouped_linear_forward(_on(x, dtype), _on(w, dtype), _on(b, dtype), offsets.to(DEVICE))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double().cpu(), want.detach(), **tol)
    dx, dw, db = grouped_linear_backward(_on(dy, dtype), _on(x, dtype), _on(w, dtype), offsets.to(DEVICE), True, True, bias)
    torch.testing.assert_close(dx.double().cpu(), xr.grad, **tol)
    scale = max(1.0, float(dy.abs().max() * x.abs().max()))  # dW sums up to 90 products
    torch.testing.assert_close(dw.double().cpu() / scale, wr.grad / scale, **tol)
    if bias:
        torch.testing.assert_close(db.double().cpu() / scale, br.grad / scale, **tol)
    else:
        assert db.numel() == 0


def test_unneeded_gradients_are_empty():
    x, w, _, dy, offsets = _case("uneven", False, torch.float32)
    dx, dw, db = grouped_linear_backward(_on(dy, torch.float32), _on(x, torch.float32), _on(w, torch.float32),
                                         offsets.to(DEVICE), False, True, False)
    assert dx.numel() == 0 and db.numel() == 0 and dw.shape == w.shape


def test_the_launch_has_a_row_tile_for_every_split_of_the_rows():
    """``row_tiles_bound`` (the grid) against the tiles a split needs, counted directly: the experts'
    rows and the dropped rows, each segment in whole tiles. Never short, and exact in the worst case."""
    rng = random.Random(0)
    for _ in range(3000):
        E, BM, S = rng.randint(1, 9), rng.choice([16, 32, 64, 128]), rng.randint(0, 700)
        cuts = sorted(rng.randint(0, S) for _ in range(E))  # offsets[1:]; rows past the last are dropped
        sizes = [b - a for a, b in zip([0, *cuts], cuts)] + [S - cuts[-1]]
        assert sum(-(-n // BM) for n in sizes) <= row_tiles_bound(S, BM, E), (S, BM, sizes)
    for E, BM in ((1, 16), (4, 32), (9, 128)):  # every segment, the dropped one too, ends in a partial tile
        sizes = [BM + 1] * E + [1]
        assert sum(-(-n // BM) for n in sizes) == row_tiles_bound(sum(sizes), BM, E)
