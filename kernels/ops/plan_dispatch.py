"""``moefx::plan_dispatch``: the layout of ``moefx::permute`` without moving any rows.

Legend: T tokens, E experts, K top-k, S = T*K slots.

Returns ``(row_slot_S, slot_row_S, offsets_E1)``, exactly as ``moefx::permute`` does, for the
ops that read token rows in place (``moefx::gather_grouped_linear``) and add results straight
into tokens (``moefx::grouped_linear_combine``). Integer outputs only: no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.kernels.ops.permute import check_layout_args, dispatch_layout


def _check(experts_TK: Tensor, num_experts: int, capacity: int | None) -> None:
    if experts_TK.dim() != 2:
        raise ValueError(f"moefx::plan_dispatch expects experts [tokens, k], got shape {tuple(experts_TK.shape)}")
    check_layout_args("moefx::plan_dispatch", num_experts, capacity)


@torch.library.custom_op("moefx::plan_dispatch", mutates_args=())
def plan_dispatch(experts_TK: Tensor, num_experts: int, capacity: int | None) -> tuple[Tensor, Tensor, Tensor]:
    _check(experts_TK, num_experts, capacity)
    return dispatch_layout(experts_TK, num_experts, capacity)


@plan_dispatch.register_fake
def _(experts_TK, num_experts, capacity):
    _check(experts_TK, num_experts, capacity)
    S = experts_TK.numel()
    index = lambda n: experts_TK.new_empty((n,), dtype=torch.int64)
    return index(S), index(S), index(num_experts + 1)
