"""``moefx::permute``: group token copies by expert, dropping those past an expert's capacity.

Legend: T tokens, D model dim, E experts, K top-k, S = T*K slots (one per token and choice).
A *slot* is ``t*K + k`` (token-major); a *row* is a position in the permuted buffer.

Layout of the permuted buffer ``x_SD`` (always S rows, so shapes never depend on the data):

    rows [offsets[e], offsets[e+1])  the slots routed to expert e, highest priority first
    rows [offsets[E], S)             dropped slots: past capacity, or routed to expert E
                                     (the "nowhere" expert a router uses to skip a choice),
                                     by expert, in the same priority

Expert ids must lie in [0, E]; they are not checked, since that would cost a device-to-host sync.
Priority inside an expert follows GShard: every token's first choice in token order, then every
second choice, and so on. With ``capacity`` set, an expert keeps its first ``capacity`` slots.

Returns ``(x_SD, row_slot_S, slot_row_S, offsets_E1)``: ``row_slot`` maps a row to its slot and
``slot_row`` is its inverse. The backward is an unpermute with unit weights (a deterministic
gather-sum, no atomics).

    x_TD ──gather rows by slot──▶ x_SD      (all S rows, dropped ones included)
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(x_TD: Tensor, experts_TK: Tensor, num_experts: int, capacity: int | None) -> None:
    if x_TD.dim() != 2 or experts_TK.dim() != 2 or x_TD.shape[0] != experts_TK.shape[0]:
        raise ValueError(
            f"moefx::permute expects x [tokens, d] and experts [tokens, k] with the same tokens, "
            f"got {tuple(x_TD.shape)} and {tuple(experts_TK.shape)}"
        )
    check_layout_args("moefx::permute", num_experts, capacity)


def check_layout_args(op: str, num_experts: int, capacity: int | None) -> None:
    """The arguments every op that builds the layout takes (permute, plan_dispatch)."""
    if num_experts < 1:
        raise ValueError(f"{op}: num_experts={num_experts} must be >= 1")
    if capacity is not None and capacity < 0:
        raise ValueError(f"{op}: capacity={capacity} must be >= 0 or None (dropless)")


def _sorted_histogram(sorted_values: Tensor, bins: int) -> Tensor:
    """Counts of 0..bins-1 in sorted values, from where each bin starts: sized by ``bins`` alone
    (``bincount`` sizes its output from the largest value, a device-to-host sync on a GPU) and
    with no atomics (deterministic)."""
    edges = torch.searchsorted(sorted_values, torch.arange(bins + 1, device=sorted_values.device))
    return edges.diff()


def dispatch_layout(experts_TK: Tensor, num_experts: int, capacity: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """The permutation alone: ``(row_slot_S, slot_row_S, offsets_E1)``, all int64 on the input's device."""
    T, K = experts_TK.shape
    S, E = T * K, num_experts
    # k-major order j = k*T + t, so a stable sort by expert keeps GShard's priority.
    expert_J = experts_TK.t().reshape(-1)
    order_S = torch.argsort(expert_J, stable=True)
    expert_S = expert_J[order_S]
    if capacity is not None:
        counts_E1 = _sorted_histogram(expert_S, E + 1)
        starts_E1 = torch.cumsum(counts_E1, 0) - counts_E1
        rank_S = torch.arange(S, device=experts_TK.device) - starts_E1[expert_S]
        expert_S = torch.where(rank_S >= capacity, E, expert_S)
        resort_S = torch.argsort(expert_S, stable=True)
        order_S, expert_S = order_S[resort_S], expert_S[resort_S]
    kept_E = _sorted_histogram(expert_S, E + 1)[:E]
    offsets_E1 = torch.zeros(E + 1, dtype=torch.int64, device=experts_TK.device)
    torch.cumsum(kept_E, 0, out=offsets_E1[1:])
    row_slot_S = (order_S % T) * K + order_S // T
    slot_row_S = torch.empty_like(row_slot_S).scatter_(0, row_slot_S, torch.arange(S, device=experts_TK.device))
    return row_slot_S, slot_row_S, offsets_E1


@torch.library.custom_op("moefx::permute", mutates_args=())
def permute(
    x_TD: Tensor, experts_TK: Tensor, num_experts: int, capacity: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check(x_TD, experts_TK, num_experts, capacity)
    row_slot_S, slot_row_S, offsets_E1 = dispatch_layout(experts_TK, num_experts, capacity)
    x_SD = x_TD.index_select(0, row_slot_S // experts_TK.shape[1])
    return x_SD, row_slot_S, slot_row_S, offsets_E1


@permute.register_fake
def _(x_TD, experts_TK, num_experts, capacity):
    _check(x_TD, experts_TK, num_experts, capacity)
    S = experts_TK.numel()
    index = lambda n: experts_TK.new_empty((n,), dtype=torch.int64)
    return x_TD.new_empty((S, x_TD.shape[1])), index(S), index(S), index(num_experts + 1)


def _setup_context(ctx, inputs, output):
    _, experts_TK, _, _ = inputs
    _, row_slot_S, slot_row_S, _ = output
    ctx.save_for_backward(row_slot_S, slot_row_S)
    ctx.top_k = experts_TK.shape[1]


def _backward(ctx, grad_x_SD, grad_row_slot, grad_slot_row, grad_offsets):
    row_slot_S, slot_row_S = ctx.saved_tensors
    T = slot_row_S.shape[0] // ctx.top_k
    ones_TK = grad_x_SD.new_ones((T, ctx.top_k))
    grad_x_TD = torch.ops.moefx.unpermute(grad_x_SD, ones_TK, slot_row_S, row_slot_S)
    return grad_x_TD, None, None, None


permute.register_autograd(_backward, setup_context=_setup_context)
