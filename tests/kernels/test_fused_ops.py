"""The fused ops a local layer runs (plan_dispatch, gather_grouped_linear, grouped_linear_combine)
against the slow reference: outputs and every gradient, over odd sizes, k, capacities, experts
with zero tokens, all tokens on one expert, and choices sent nowhere."""

import pytest
import torch

import moefx.kernels  # noqa: F401
from moefx.kernels import reference
from tests.kernels.cases import all_cases, choices

CASES = list(all_cases())
CAPACITIES = [None, 0, 1, 3]


def _layout(experts, E, capacity):
    """The reference layout, as the ops take it: (row_slot, slot_row, offsets) tensors, and lists."""
    row_slot, offsets = reference.dispatch_layout(experts, E, capacity)
    slot_row = torch.empty(len(row_slot), dtype=torch.long)
    slot_row[torch.tensor(row_slot)] = torch.arange(len(row_slot))
    return torch.tensor(row_slot), slot_row, torch.tensor(offsets), row_slot, offsets


def _grads(out, leaves, grad):
    if not out.requires_grad:  # every row dropped: the output is a constant
        return [torch.zeros_like(t) for t in leaves]
    return torch.autograd.grad(out, leaves, grad, allow_unused=True, materialize_grads=True)


def _clones(leaves):
    return [t.detach().clone().requires_grad_() for t in leaves]


@pytest.mark.parametrize("case,T,E,K,kind", CASES)
@pytest.mark.parametrize("capacity", CAPACITIES)
def test_plan_dispatch_is_the_permute_layout(case, T, E, K, kind, capacity):
    experts = choices(kind, T, E, K)
    row_slot, slot_row, offsets = torch.ops.moefx.plan_dispatch(experts, E, capacity)
    ref_row_slot, ref_offsets = reference.dispatch_layout(experts, E, capacity)
    assert row_slot.tolist() == ref_row_slot
    assert offsets.tolist() == ref_offsets
    assert torch.equal(slot_row[row_slot], torch.arange(T * K))


@pytest.mark.parametrize("case,T,E,K,kind", CASES)
@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("bias", [True, False])
def test_gather_grouped_linear_matches_reference(case, T, E, K, kind, capacity, bias):
    experts = choices(kind, T, E, K)
    row_slot, slot_row, offsets, row_slot_list, offsets_list = _layout(experts, E, capacity)
    I, O = 5, 3
    leaves = [torch.randn(T, I, dtype=torch.float64, requires_grad=True),
              torch.randn(E, O, I, dtype=torch.float64, requires_grad=True)]
    if bias:
        leaves.append(torch.randn(E, O, dtype=torch.float64, requires_grad=True))
    ref = _clones(leaves)
    b, ref_b = (leaves[2], ref[2]) if bias else (None, None)

    y = torch.ops.moefx.gather_grouped_linear(leaves[0], leaves[1], b, offsets, row_slot, slot_row)
    want = reference.gather_grouped_linear(ref[0], ref[1], ref_b, offsets_list, [s // K for s in row_slot_list])
    torch.testing.assert_close(y, want)
    grad = torch.randn_like(y)
    for got, expected in zip(torch.autograd.grad(y, leaves, grad), _grads(want, ref, grad)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("case,T,E,K,kind", CASES)
@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_combine_matches_reference(case, T, E, K, kind, capacity, bias):
    experts = choices(kind, T, E, K)
    row_slot, _, offsets, row_slot_list, offsets_list = _layout(experts, E, capacity)
    I, O = 4, 6
    leaves = [torch.randn(T * K, I, dtype=torch.float64, requires_grad=True),
              torch.randn(E, O, I, dtype=torch.float64, requires_grad=True),
              torch.rand(T, K, dtype=torch.float64, requires_grad=True)]
    if bias:
        leaves.append(torch.randn(E, O, dtype=torch.float64, requires_grad=True))
    ref = _clones(leaves)
    b, ref_b = (leaves[3], ref[3]) if bias else (None, None)

    out = torch.ops.moefx.grouped_linear_combine(leaves[0], leaves[1], b, offsets, row_slot, leaves[2])
    want = reference.grouped_linear_combine(ref[0], ref[1], ref_b, offsets_list, row_slot_list, ref[2])
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, leaves, grad), _grads(want, ref, grad)):
        torch.testing.assert_close(got, expected)


def test_fused_ops_skip_choices_sent_to_the_nowhere_expert():
    experts = torch.tensor([[0, 3], [1, 3], [1, 0]])  # expert 3 == num_experts: skipped choices
    row_slot, slot_row, offsets = torch.ops.moefx.plan_dispatch(experts, 3, None)
    x, weights = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    w, v = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    h = torch.ops.moefx.gather_grouped_linear(x, w, None, offsets, row_slot, slot_row)
    assert offsets[-1] == 4 and not h[4:].any(), "rows of skipped choices are zero"
    out = torch.ops.moefx.grouped_linear_combine(h, v, None, offsets, row_slot, weights)
    torch.testing.assert_close(out[0], weights[0, 0] * (v[0] @ (w[0] @ x[0])))  # token 0: its expert-0 choice only


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("capacity", [None, 2])
def test_fused_ops_opcheck_and_gradcheck(K, capacity):
    T, E = 9, 6
    experts = choices("random", T, E, K)
    row_slot, slot_row, offsets = torch.ops.moefx.plan_dispatch(experts, E, capacity)
    x = torch.randn(T, 4, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, 3, 4, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(E, 3, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, 4, 3, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(E, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    h = torch.randn(T * K, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.moefx.plan_dispatch, (experts, E, capacity))
    torch.library.opcheck(torch.ops.moefx.gather_grouped_linear, (x, w1, b1, offsets, row_slot, slot_row))
    torch.library.opcheck(torch.ops.moefx.grouped_linear_combine, (h, w2, b2, offsets, row_slot, weights))
    torch.autograd.gradcheck(lambda *a: torch.ops.moefx.gather_grouped_linear(*a, offsets, row_slot, slot_row), (x, w1, b1))
    torch.autograd.gradcheck(
        lambda h, w, b, weights: torch.ops.moefx.grouped_linear_combine(h, w, b, offsets, row_slot, weights),
        (h, w2, b2, weights),
    )


def test_fused_ops_compute_only_the_gradients_asked_for():
    """Frozen weights and inputs: each gradient alone is still right."""
    experts = choices("random", 7, 4, 2)
    row_slot, slot_row, offsets = torch.ops.moefx.plan_dispatch(experts, 4, None)
    x = torch.randn(7, 5, dtype=torch.float64)
    w = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda w: torch.ops.moefx.gather_grouped_linear(x, w, None, offsets, row_slot, slot_row), (w,))
    h = torch.randn(14, 3, dtype=torch.float64)
    v = torch.randn(4, 5, 3, dtype=torch.float64)
    weights = torch.rand(7, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda p: torch.ops.moefx.grouped_linear_combine(h, v, None, offsets, row_slot, p), (weights,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_ops_low_precision_close_to_fp32(dtype):
    experts = choices("random", 20, 4, 2)
    row_slot, slot_row, offsets = torch.ops.moefx.plan_dispatch(experts, 4, None)
    x, w1, w2 = torch.randn(20, 16), torch.randn(4, 8, 16) / 4, torch.randn(4, 16, 8) / 3
    weights = torch.rand(20, 2)

    def run(cast):
        h = torch.ops.moefx.gather_grouped_linear(cast(x), cast(w1), None, offsets, row_slot, slot_row)
        return torch.ops.moefx.grouped_linear_combine(h, cast(w2), None, offsets, row_slot, weights)

    got, want = run(lambda t: t.to(dtype)), run(lambda t: t)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)


def test_fused_ops_reject_bad_inputs():
    offsets, index = torch.tensor([0, 2, 4]), torch.arange(4)
    with pytest.raises(ValueError, match=r"row_slot and slot_row must be 1-D integer tensors of T\*K entries for x of 3 tokens"):
        torch.ops.moefx.gather_grouped_linear(torch.randn(3, 5), torch.randn(2, 4, 5), None, offsets, index, index)
    with pytest.raises(ValueError, match=r"torch.float32 \(4,\)"):
        torch.ops.moefx.gather_grouped_linear(torch.randn(2, 5), torch.randn(2, 4, 5), None, offsets, index.float(), index)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 4, 6\)"):
        torch.ops.moefx.gather_grouped_linear(torch.randn(2, 5), torch.randn(2, 4, 6), None, offsets, index, index)
    with pytest.raises(ValueError, match=r"h \[T\*K, in\].*\(4, 5\), \(4,\) and \(3, 2\)"):
        torch.ops.moefx.grouped_linear_combine(
            torch.randn(4, 5), torch.randn(2, 4, 5), None, offsets, torch.arange(4), torch.rand(3, 2)
        )
    with pytest.raises(ValueError, match=r"offsets \[0, 3, 2\] must start at 0"):
        torch.ops.moefx.grouped_linear_combine(
            torch.randn(4, 5), torch.randn(2, 4, 5), None, torch.tensor([0, 3, 2]), torch.arange(4), torch.rand(2, 2)
        )
    with pytest.raises(ValueError, match=r"capacity=-1 must be >= 0"):
        torch.ops.moefx.plan_dispatch(torch.zeros(3, 1, dtype=torch.long), 2, -1)
