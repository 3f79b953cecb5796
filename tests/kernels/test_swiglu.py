"""``moefx::swiglu`` against silu(gate) * up written out with autograd, in float64."""

import pytest
import torch
import torch.nn.functional as F

import moefx.kernels  # noqa: F401


def _reference(h):
    H = h.shape[-1] // 2
    return F.silu(h[..., :H]) * h[..., H:]


@pytest.mark.parametrize("shape", [(7, 6), (1, 2), (0, 4), (3, 5, 10)])
def test_swiglu_matches_silu_times_up_with_gradients(shape):
    h = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ref_h = h.detach().clone().requires_grad_()
    out, want = torch.ops.moefx.swiglu(h), _reference(ref_h)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(h.grad, ref_h.grad)


def test_swiglu_opcheck_and_gradcheck():
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.moefx.swiglu, (h,))
    torch.autograd.gradcheck(torch.ops.moefx.swiglu, (h,))


def test_swiglu_rejects_an_odd_width():
    with pytest.raises(ValueError, match=r"equal width, got shape \(4, 5\)"):
        torch.ops.moefx.swiglu(torch.randn(4, 5))
