import pytest
import torch

import moefx.kernels  # noqa: F401
from moefx.kernels import reference
from tests.kernels.cases import all_cases, choices

CASES = list(all_cases())


@pytest.mark.parametrize("case,T,E,K,kind", CASES)
def test_unpermute_matches_reference(case, T, E, K, kind):
    experts = choices(kind, T, E, K)
    _, row_slot, slot_row, _ = torch.ops.moefx.permute(torch.randn(T, 1), experts, E, None)
    y = torch.randn(T * K, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    out = torch.ops.moefx.unpermute(y, w, slot_row, row_slot)
    ref_y, ref_w = y.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref_out = reference.unpermute(ref_y, ref_w, row_slot.tolist())
    torch.testing.assert_close(out, ref_out)

    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref_out * grad).sum().backward()
    torch.testing.assert_close(y.grad, ref_y.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_unpermute_opcheck_and_gradcheck(K):
    T, E = 7, 5
    _, row_slot, slot_row, _ = torch.ops.moefx.permute(torch.randn(T, 1), choices("random", T, E, K), E, None)
    y = torch.randn(T * K, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.moefx.unpermute, (y, w, slot_row, row_slot))
    torch.autograd.gradcheck(lambda y, w: torch.ops.moefx.unpermute(y, w, slot_row, row_slot), (y, w))


def test_unpermute_bf16_accumulates_in_fp32():
    """Eight bf16 terms summed with a single final rounding: the result is the exact sum rounded
    once to bf16. Summing in bf16 would round after every term and miss it for many tokens."""
    T, K = 512, 8
    y = torch.randn(T * K, 16).to(torch.bfloat16)
    w = torch.rand(T, K)
    slot_row = torch.randperm(T * K)
    row_slot = torch.argsort(slot_row)
    exact = (w.double().unsqueeze(2) * y.double()[slot_row].view(T, K, 16)).sum(1)
    got = torch.ops.moefx.unpermute(y, w, slot_row, row_slot)
    assert got.dtype == torch.bfloat16
    assert (got == exact.to(torch.bfloat16)).float().mean() > 0.99
