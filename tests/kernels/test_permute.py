import pytest
import torch

import moefx.kernels  # noqa: F401
from moefx.kernels import reference
from tests.kernels.cases import all_cases, choices

CASES = list(all_cases())
CAPACITIES = [None, 0, 1, 3]


@pytest.mark.parametrize("case,T,E,K,kind", CASES)
@pytest.mark.parametrize("capacity", CAPACITIES)
def test_permute_matches_reference(case, T, E, K, kind, capacity):
    experts = choices(kind, T, E, K)
    x = torch.randn(T, 3, dtype=torch.float64, requires_grad=True)
    x_SD, row_slot, slot_row, offsets = torch.ops.moefx.permute(x, experts, E, capacity)
    ref_x = x.detach().clone().requires_grad_()
    ref_SD, ref_row_slot, ref_offsets = reference.permute(ref_x, experts, E, capacity)

    assert row_slot.tolist() == ref_row_slot
    assert offsets.tolist() == ref_offsets
    assert torch.equal(slot_row[row_slot], torch.arange(T * K))
    torch.testing.assert_close(x_SD, ref_SD)

    grad = torch.randn_like(x_SD)
    (x_SD * grad).sum().backward()
    (ref_SD * grad).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_permute_opcheck_and_gradcheck(K, capacity):
    experts = choices("random", 9, 6, K)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.moefx.permute, (x, experts, 6, capacity))
    torch.autograd.gradcheck(lambda x: torch.ops.moefx.permute(x, experts, 6, capacity)[0], (x,))


def test_permute_drops_choices_sent_to_the_nowhere_expert():
    experts = torch.tensor([[0, 3], [1, 3], [1, 0]])  # expert 3 == num_experts: skipped choices
    _, row_slot, _, offsets = torch.ops.moefx.permute(torch.randn(3, 2), experts, 3, None)
    assert offsets.tolist() == [0, 2, 4, 4]
    assert sorted(row_slot[4:].tolist()) == [1, 3]  # slots (t=0,k=1) and (t=1,k=1)


def test_permute_capacity_keeps_first_choices_before_second_choices():
    # Expert 0 has capacity 2: token 2's first choice outranks tokens 0 and 1's second choices.
    experts = torch.tensor([[1, 0], [1, 0], [0, 1]])
    _, row_slot, _, offsets = torch.ops.moefx.permute(torch.randn(3, 2), experts, 2, 2)
    assert offsets.tolist() == [0, 2, 4]
    assert row_slot[:2].tolist() == [2 * 2 + 0, 0 * 2 + 1]  # (t=2,k=0) then (t=0,k=1)
    assert row_slot[4:].tolist() == [1 * 2 + 1, 2 * 2 + 1]  # dropped: (t=1,k=1) for expert 0, (t=2,k=1) for 1


def test_permute_rejects_mismatched_tokens():
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(3, 1\)"):
        torch.ops.moefx.permute(torch.randn(4, 2), torch.zeros(3, 1, dtype=torch.long), 2, None)
