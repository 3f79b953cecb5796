import pytest
import torch

import moefx.kernels  # noqa: F401
from moefx.kernels import reference

# Segment sizes per expert, then dropped rows at the end.
SEGMENTS = {
    "uneven": ([3, 1, 5], 0),
    "zero-token-experts": ([0, 4, 0, 3, 0], 0),
    "one-row": ([0, 1, 0], 0),
    "all-to-one": ([7, 0, 0, 0], 0),
    "dropped-tail": ([2, 0, 3], 4),
    "all-dropped": ([0, 0], 3),
}


def _offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])


@pytest.mark.parametrize("name", SEGMENTS)
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_matches_reference(name, bias):
    sizes, dropped = SEGMENTS[name]
    E, I, O = len(sizes), 5, 3
    S = sum(sizes) + dropped
    x = torch.randn(S, I, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, O, I, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, O, dtype=torch.float64, requires_grad=True) if bias else None
    offsets = _offsets(sizes)
    y = torch.ops.moefx.grouped_linear(x, w, b, offsets)

    leaves = [t for t in (x, w, b) if t is not None]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref_b = ref_leaves[2] if bias else None
    ref_y = reference.grouped_linear(ref_leaves[0], ref_leaves[1], ref_b, offsets.tolist())
    torch.testing.assert_close(y, ref_y)
    assert not y[sum(sizes):].any(), "dropped rows must be zero"

    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, grad)
    # With every row dropped the reference output is a constant: all gradients are zero.
    want = (
        torch.autograd.grad(ref_y, ref_leaves, grad, allow_unused=True, materialize_grads=True)
        if ref_y.requires_grad
        else [torch.zeros_like(t) for t in ref_leaves]
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("name", ["uneven", "zero-token-experts", "dropped-tail"])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_opcheck_and_gradcheck(name, bias):
    sizes, dropped = SEGMENTS[name]
    E, S = len(sizes), sum(sizes) + dropped
    x = torch.randn(S, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, 3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, 3, dtype=torch.float64, requires_grad=True) if bias else None
    offsets = _offsets(sizes)
    torch.library.opcheck(torch.ops.moefx.grouped_linear, (x, w, b, offsets))
    torch.autograd.gradcheck(lambda *a: torch.ops.moefx.grouped_linear(*a, offsets), (x, w, b))


def test_grouped_linear_weight_grad_only():
    """Frozen inputs: only the weight gradient is computed, and it is right."""
    x = torch.randn(6, 4, dtype=torch.float64)
    w = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 2, 6])
    torch.autograd.gradcheck(lambda w: torch.ops.moefx.grouped_linear(x, w, None, offsets), (w,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_linear_low_precision_close_to_fp32(dtype):
    x, w = torch.randn(10, 16), torch.randn(3, 8, 16)
    offsets = torch.tensor([0, 4, 4, 10])
    want = torch.ops.moefx.grouped_linear(x, w, None, offsets)
    got = torch.ops.moefx.grouped_linear(x.to(dtype), w.to(dtype), None, offsets)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-1)


@pytest.mark.parametrize("offsets", [[1, 2, 4], [0, 3, 2], [0, 2, 5]])
def test_grouped_linear_rejects_offsets_that_are_not_a_layout(offsets):
    with pytest.raises(ValueError, match=r"offsets \[.*\] must start at 0"):
        torch.ops.moefx.grouped_linear(torch.randn(4, 5), torch.randn(2, 3, 5), None, torch.tensor(offsets))


def test_grouped_linear_rejects_wrong_in_features():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(2, 3, 6\)"):
        torch.ops.moefx.grouped_linear(torch.randn(4, 5), torch.randn(2, 3, 6), None, torch.tensor([0, 2, 4]))
