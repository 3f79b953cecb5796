"""The Triton route kernel against the op's default implementation (itself tested against a
slow loop): weights, experts and counts, both softmax placements, odd sizes, k up to E."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'moefx[triton]')")

import moefx.kernels  # noqa: F401
from moefx.kernels.triton.route import route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 2), (37, 5, 1), (70, 8, 2), (9, 7, 3), (13, 6, 6), (5, 64, 8)])
@pytest.mark.parametrize("softmax_first,renormalize", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_route_matches_the_default_implementation(tokens, experts, top_k, softmax_first, renormalize, dtype):
    g = torch.Generator().manual_seed(tokens * 100 + experts)
    logits = (torch.randn(tokens, experts, generator=g) * 3).to(dtype)  # distinct values: no ties
    want_w, want_e, want_c = torch.ops.moefx.route(logits, top_k, renormalize, softmax_first)
    got_w, got_e, got_c = route(logits.to(DEVICE), top_k, renormalize, softmax_first)
    assert torch.equal(got_e.cpu(), want_e)
    assert torch.equal(got_c.cpu(), want_c)
    assert got_w.dtype == want_w.dtype
    torch.testing.assert_close(got_w.cpu(), want_w, rtol=1e-6, atol=1e-6)


def test_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    _, experts, _ = route(logits.to(DEVICE), 2, True, True)
    assert experts.cpu().tolist() == [[1, 2]]


@pytest.mark.parametrize("experts", [6, 8])  # padded to 8 columns, and not padded
def test_a_nan_row_picks_real_experts_and_keeps_its_nan(experts):
    """A diverged router (NaN logits) must not send a token to an expert that does not exist
    (out-of-bounds reads later), nor hide the NaN: its weights stay NaN."""
    logits = torch.randn(4, experts)
    logits[1] = float("nan")
    weights, chosen, counts = route(logits.to(DEVICE), 2, True, True)
    assert ((chosen >= 0) & (chosen < experts)).all()
    assert int(counts.sum()) == 8
    assert torch.isnan(weights[1]).all() and torch.isfinite(weights[[0, 2, 3]]).all()
