"""Properties of route/permute/unpermute over random sizes and routings (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moefx.kernels  # noqa: F401


@st.composite
def routings(draw):
    T = draw(st.integers(1, 40))
    E = draw(st.integers(1, 9))
    K = draw(st.integers(1, E))
    seed = draw(st.integers(0, 2**31 - 1))
    capacity = draw(st.one_of(st.none(), st.integers(0, T * K)))
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    return logits, K, capacity


SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(routings())
def test_counts_sum_to_tokens_times_k(routing):
    logits, K, _ = routing
    _, experts, counts = torch.ops.moefx.route(logits, K, True, True)
    assert int(counts.sum()) == logits.shape[0] * K
    assert torch.equal(counts, torch.bincount(experts.flatten(), minlength=logits.shape[1]))


@SETTINGS
@given(routings())
def test_offsets_monotone_and_within_capacity(routing):
    logits, K, capacity = routing
    T, E = logits.shape
    _, experts, counts = torch.ops.moefx.route(logits, K, True, True)
    _, row_slot, slot_row, offsets = torch.ops.moefx.permute(torch.zeros(T, 1), experts, E, capacity)
    sizes = offsets.diff()
    assert offsets[0] == 0 and (sizes >= 0).all() and offsets[-1] <= T * K
    kept = counts if capacity is None else counts.clamp(max=capacity)
    assert torch.equal(sizes, kept)
    assert torch.equal(slot_row[row_slot], torch.arange(T * K))
    # Every kept row holds a slot routed to the expert that owns the row.
    owner = torch.repeat_interleave(torch.arange(E), sizes)
    assert torch.equal(experts.flatten()[row_slot[: int(offsets[-1])]], owner)


@SETTINGS
@given(routings())
def test_permute_then_unpermute_with_unit_weights_is_identity(routing):
    logits, K, _ = routing
    T, E = logits.shape
    x = torch.randn(T, 6, dtype=torch.float64)
    _, experts, _ = torch.ops.moefx.route(logits, K, True, True)
    x_SD, row_slot, slot_row, _ = torch.ops.moefx.permute(x, experts, E, None)
    # Unit weights (each 1/K, summing to one per token) give every token back unchanged.
    unit = torch.full((T, K), 1.0 / K, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.moefx.unpermute(x_SD, unit, slot_row, row_slot), x)
    # Weight one on each choice sums K copies.
    torch.testing.assert_close(torch.ops.moefx.unpermute(x_SD, torch.ones_like(unit), slot_row, row_slot), K * x)
