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
Then assign an instance to ``layer.dispatcher``; nothing else asks which class it is. A
dispatcher that interleaves its exchange with the experts (chunks in flight, experts replicated
for a step) overrides ``run``, which the layer calls on the permuted path, and may describe what
it moved in ``DispatchMeta.exchange`` (the layer's ``stats()`` carries it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class ExchangeStats:
    """What an expert-parallel exchange moved in one forward, seen from this rank (host numbers: the
    exchange's sizes are on the host already). The backward sends as much again, the other way."""

    bytes_sent: int  # token rows sent to other ranks (dispatch and combine) plus expert weights broadcast
    messages_sent: int  # point-to-point messages to other ranks inside the all-to-alls
    inter_node_messages: int | None  # of those, to ranks of other nodes (None: the node layout is unknown)
    shadowed_experts: tuple[int, ...] = ()  # experts replicated to every rank for this step
    shadow_bytes_saved: int = 0  # over the EP group, forward and backward: token bytes not sent minus weight bytes


@dataclass(frozen=True)
class DispatchMeta:
    """What every dispatcher returns; a dispatcher that needs more for ``combine`` subclasses it."""

    row_slot_S: Tensor  # permuted row -> slot (t*K + k)
    slot_row_S: Tensor  # slot -> permuted row
    offsets_E1: Tensor  # the local experts' rows: expert e owns [offsets[e], offsets[e+1]); rows past offsets[-1] are dropped
    permute_offsets_E1: Tensor  # this process's token copies per expert (all E), as offsets: the layer's statistics
    exchange: ExchangeStats | None = field(default=None, kw_only=True)  # what moved between ranks, if anything


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

    def run(
        self, experts, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, num_experts: int, capacity: int | None
    ) -> tuple[Tensor, DispatchMeta]:
        """The permuted path: ``dispatch``, the experts, ``combine``. A dispatcher that computes while
        it exchanges (chunks in flight, replicated experts) overrides it; ``[T, D]`` and the metadata."""
        x_SD, meta = self.dispatch(x_TD, experts_TK, num_experts, capacity)
        return self.combine(experts(x_SD, meta.offsets_E1), weights_TK, meta), meta


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
