import pytest
import torch

import moefx.kernels  # noqa: F401
from moefx.kernels import reference
from tests.kernels.cases import SIZES

MODES = [(True, True), (True, False), (False, True)]  # (softmax_first, renormalize)


@pytest.mark.parametrize("name,T,E,K", SIZES)
@pytest.mark.parametrize("softmax_first,renormalize", MODES)
def test_route_matches_reference_outputs_and_gradient(name, T, E, K, softmax_first, renormalize):
    torch.manual_seed(T * E + K)
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    weights, experts, counts = torch.ops.moefx.route(logits, K, renormalize, softmax_first)
    ref_logits = logits.detach().clone().requires_grad_()
    ref_weights, ref_experts, ref_counts = reference.route(ref_logits, K, renormalize, softmax_first)

    assert torch.equal(experts, ref_experts)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(weights, ref_weights)
    assert int(counts.sum()) == T * K

    grad = torch.randn_like(weights)
    (weights * grad).sum().backward()
    (ref_weights * grad).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


@pytest.mark.parametrize("softmax_first,renormalize", MODES)
@pytest.mark.parametrize("K", [1, 2, 4])
def test_route_opcheck_and_gradcheck(softmax_first, renormalize, K):
    logits = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.moefx.route, (logits, K, renormalize, softmax_first))
    torch.autograd.gradcheck(lambda l: torch.ops.moefx.route(l, K, renormalize, softmax_first)[0], (logits,))


def test_route_keeps_fp32_for_low_precision_logits():
    logits = torch.randn(8, 4).to(torch.bfloat16)
    weights, _, _ = torch.ops.moefx.route(logits, 2, True, True)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(8))


def test_route_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k=5"):
        torch.ops.moefx.route(torch.randn(3, 4), 5, True, True)
