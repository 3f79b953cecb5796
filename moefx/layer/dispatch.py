"""Dispatchers move token copies to their experts and back.

Legend: T tokens, D model dim, E experts, K top-k, S = T*K slots.

``dispatch()`` returns the permuted rows and a frozen ``DispatchMeta`` that ``combine()`` takes
back; nothing is parked on the dispatcher. ``LocalDispatcher`` keeps every expert in this
process; the expert-parallel one (``moefx.parallel.all_to_all_dispatcher``) adds the all-to-all
exchange around the same ops.

Adding a dispatcher is one file: subclass ``Dispatcher`` and implement ``dispatch`` and
``combine``, returning a ``DispatchMeta`` (or a subclass of it carrying what ``combine`` needs).
Set ``mesh`` when the experts are sharded over a device mesh (checkpoints then write them as
shards, and ``moefx.model.is_expert_parallel`` is True), and ``fuses_experts`` with ``plan`` when
rows need not move, so experts that read token order themselves can skip the permuted copy.
Then assign an instance to ``layer.dispatcher``; nothing else asks which class it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class DispatchMeta:
    """What every dispatcher returns; a dispatcher that needs more for ``combine`` subclasses it."""

    row_slot_S: Tensor  # permuted row -> slot (t*K + k)
    slot_row_S: Tensor  # slot -> permuted row
    offsets_E1: Tensor  # the local experts' rows: expert e owns [offsets[e], offsets[e+1]); rows past offsets[-1] are dropped
    permute_offsets_E1: Tensor  # this process's token copies per expert (all E), as offsets: the layer's statistics


class Dispatcher(ABC):
    """Moves the token copies of a layer to the rows its experts compute on, and back."""

    mesh: DeviceMesh | None = None  # the mesh the experts are sharded over; None: all in this process
    fuses_experts: bool = False  # whether ``plan`` suffices: rows stay in place (experts may read tokens)

    def plan(self, experts_TK: Tensor, num_experts: int, capacity: int | None) -> DispatchMeta:
        """The metadata of ``dispatch`` without moving any row, for experts that read and write
        token order themselves (``Experts.forward_tokens``). Only when ``fuses_experts``."""
        raise NotImplementedError(f"{type(self).__name__} moves rows: it has no plan alone (fuses_experts is False)")

    @abstractmethod
    def dispatch(
        self, x_TD: Tensor, experts_TK: Tensor, num_experts: int, capacity: int | None
    ) -> tuple[Tensor, DispatchMeta]:
        """The rows the experts compute on, grouped by expert, and the metadata ``combine`` takes."""

    @abstractmethod
    def combine(self, y_SD: Tensor, weights_TK: Tensor, meta: DispatchMeta) -> Tensor:
        """The experts' rows back in token order, summed with the routing weights: ``[T, D]``."""


class LocalDispatcher(Dispatcher):
    """All experts live in this process: permute, then unpermute; or, for experts that read and
    write token order themselves (``GroupedExperts.forward_tokens``), only the plan."""

    fuses_experts = True

    def plan(self, experts_TK: Tensor, num_experts: int, capacity: int | None) -> DispatchMeta:
        row_slot_S, slot_row_S, offsets_E1 = torch.ops.moefx.plan_dispatch(experts_TK, num_experts, capacity)
        return DispatchMeta(row_slot_S, slot_row_S, offsets_E1, offsets_E1)

    def dispatch(
        self, x_TD: Tensor, experts_TK: Tensor, num_experts: int, capacity: int | None
    ) -> tuple[Tensor, DispatchMeta]:
        x_SD, row_slot_S, slot_row_S, offsets_E1 = torch.ops.moefx.permute(x_TD, experts_TK, num_experts, capacity)
        return x_SD, DispatchMeta(row_slot_S, slot_row_S, offsets_E1, offsets_E1)

    def combine(self, y_SD: Tensor, weights_TK: Tensor, meta: DispatchMeta) -> Tensor:
        return torch.ops.moefx.unpermute(y_SD, weights_TK, meta.slot_row_S, meta.row_slot_S)
