"""Dispatchers move token copies to their experts and back.

Legend: T tokens, D model dim, E experts, K top-k, S = T*K slots.

``dispatch()`` returns the permuted rows and a frozen ``DispatchMeta`` that ``combine()`` takes
back; nothing is parked on the dispatcher. ``LocalDispatcher`` keeps every expert in this
process; an expert-parallel dispatcher adds the all-to-all exchange around the same ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)


@dataclass(frozen=True)
class DispatchMeta:
    row_slot_S: Tensor  # permuted row -> slot (t*K + k)
    slot_row_S: Tensor  # slot -> permuted row
    offsets_E1: Tensor  # expert e owns rows [offsets[e], offsets[e+1]); rows past offsets[E] are dropped

    @property
    def permute_offsets_E1(self) -> Tensor:
        """This process's token copies per expert, as offsets (the layer's statistics)."""
        return self.offsets_E1


class LocalDispatcher:
    """All experts live in this process: permute, then unpermute; or, for experts that read and
    write token order themselves (``GroupedExperts.forward_tokens``), only the plan."""

    def plan(self, experts_TK: Tensor, num_experts: int, capacity: int | None) -> DispatchMeta:
        return DispatchMeta(*torch.ops.moefx.plan_dispatch(experts_TK, num_experts, capacity))

    def dispatch(
        self, x_TD: Tensor, experts_TK: Tensor, num_experts: int, capacity: int | None
    ) -> tuple[Tensor, DispatchMeta]:
        x_SD, row_slot_S, slot_row_S, offsets_E1 = torch.ops.moefx.permute(x_TD, experts_TK, num_experts, capacity)
        return x_SD, DispatchMeta(row_slot_S, slot_row_S, offsets_E1)

    def combine(self, y_SD: Tensor, weights_TK: Tensor, meta: DispatchMeta) -> Tensor:
        return torch.ops.moefx.unpermute(y_SD, weights_TK, meta.slot_row_S, meta.row_slot_S)
