"""The expert-parallel dispatcher of ``parallelize(overlap_chunks=N, ranks_per_node=R, shadowing=...)``.

Legend: T tokens, D model dim, E experts, L = E/P local experts, P EP ranks, S = T*K slots, N chunks.

One forward of a layer::

    permute ─▶ source buffer (this rank's rows by expert; capacity mode: C rows per expert, padded)
    counts of every rank gathered (one small all-gather: the only host sync) ─▶ ExchangePlan
    shadowed experts (shadowing.py): their rows computed here, on replicas of their weights
    chunk 0 dispatched ─┐
    for each chunk c:   wait for c's rows ─▶ launch c+1's dispatch ─▶ experts on c ─▶ launch c's combine
    wait for every combine ─▶ rows back in the source buffer ─▶ unpermute

so the all-to-all of one chunk runs while the experts compute another (``async_exchange``: the
backward overlaps the same way). A two-level exchange (``ranks_per_node``) has two stages per
direction: the first overlaps as above, the second runs when the first is done.

With ``overlap_chunks=1`` the exchange is the synchronous ``moefx::all_to_all`` op.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)
from moefx.layer.dispatch import DispatchMeta, ExchangeStats
from moefx.parallel import async_exchange
from moefx.parallel.all_to_all_dispatcher import AllToAllDispatcher
from moefx.parallel.exchange_plan import ExchangePlan, Stage
from moefx.parallel.hierarchical import ExchangeGroups
from moefx.parallel.shadowing import ShadowingCostModel, shadow_experts


class ScheduledDispatcher(AllToAllDispatcher):
    """All-to-all dispatch in ``overlap_chunks`` chunks, over one or two levels (``groups``), with
    hot experts shadowed when ``cost_model`` is set. Computes the experts itself (``run``)."""

    def __init__(self, mesh: DeviceMesh, num_experts: int, *, overlap_chunks: int, groups: ExchangeGroups,
                 cost_model: ShadowingCostModel | None, gate: str = "topk") -> None:
        super().__init__(mesh, num_experts, gate=gate)
        self.chunks, self.groups, self.cost_model = overlap_chunks, groups, cost_model
        self.ep_rank = mesh["ep"].get_local_rank()

    def dispatch(self, x_TD, experts_TK, num_experts, capacity):
        raise NotImplementedError("ScheduledDispatcher computes the experts between its exchanges: call run()")

    def combine(self, y_SD, weights_TK, meta):
        raise NotImplementedError("ScheduledDispatcher computes the experts between its exchanges: call run()")

    def run(self, experts, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, num_experts: int,
            capacity: int | None) -> tuple[Tensor, DispatchMeta]:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "parallelize's overlap_chunks, ranks_per_node and shadowing run eagerly (a host-side plan per layer, "
                "asynchronous collectives): compile or export a model parallelized without them"
            )
        x_SD, row_slot_S, slot_row_S, offsets_E1 = torch.ops.moefx.permute(x_TD, experts_TK, num_experts, capacity)
        P, E, D = self.ep_size, num_experts, x_SD.shape[1]
        counts_E = offsets_E1[1:] - offsets_E1[:-1]
        if capacity is None:
            counts_PE = self._gather_counts(counts_E)  # NOTE: device-to-host sync (the splits)
            load = counts = counts_PE.tolist()
            x_src = x_SD
        else:
            self._check_equal_token_counts(x_TD)
            x_src, position_S = self._padded(x_SD, offsets_E1, capacity)
            counts = [[capacity] * E for _ in range(P)]  # equal splits, whatever the routing
            counts_PE = torch.full((P, E), capacity, dtype=torch.int64)
        shadowed, row_bytes, weight_bytes = (), D * x_SD.element_size(), self._weight_bytes(experts)
        # Capacity mode sends and computes C rows per (rank, expert) whatever the routing: no expert
        # is hotter than another there, so shadowing has nothing to gain (and no sync is added).
        if self.cost_model is not None and capacity is None:
            flops_per_row = 2 * (experts.in_proj[0].numel() + experts.out_proj[0].numel())
            shadowed = self.cost_model.choose(load, self.local_experts, row_bytes, weight_bytes, flops_per_row)
        plan = ExchangePlan(counts_PE, self.ep_rank, self.local_experts, self.chunks, self.groups.ranks_per_node, shadowed)
        y_src = self._exchange_and_compute(plan, experts, x_src)
        if capacity is None:
            y_SD = torch.cat([y_src, y_src.new_zeros(x_SD.shape[0] - y_src.shape[0], D)])
        else:
            y_SD = torch.cat([y_src, y_src.new_zeros(1, D)]).index_select(0, position_S)  # dropped: zeros
        out_TD = torch.ops.moefx.unpermute(y_SD, weights_TK, slot_row_S, row_slot_S)
        local_rows = [sum(route.local_rows[i] for route in plan.routes) for i in range(self.local_experts)]
        local_offsets = torch.tensor([0, *accumulate(local_rows)], device=x_SD.device)
        meta = DispatchMeta(row_slot_S, slot_row_S, local_offsets, offsets_E1,
                            exchange=self._stats(plan, counts, row_bytes, weight_bytes))
        return out_TD, meta

    # --- the schedule -------------------------------------------------------------------------

    def _exchange_and_compute(self, plan: ExchangePlan, experts, x_src: Tensor) -> Tensor:
        device, N = x_src.device, self.chunks
        send_index = [plan.gather_index(plan.source_blocks, route.stages[0].send_blocks, device) for route in plan.routes]
        in_flight = self._begin(x_src.index_select(0, send_index[0]), plan, plan.routes[0].stages[0], reverse=False)
        outputs, places = [], []
        if plan.shadowed:  # computed while chunk 0 travels
            order = tuple(sorted(plan.shadowed))
            order_X = torch.tensor(order, dtype=torch.int64)
            places.append(plan.gather_index(plan.source_blocks, plan.source_rows_of(order_X), device))
            rows = plan.sizes_PEN[plan.me, order_X].sum(1).tolist()
            outputs.append(shadow_experts(experts, x_src.index_select(0, places[0]), rows, order, self.local_experts,
                                          plan.me, self.groups.ep))
        combines = []
        for c, route in enumerate(plan.routes):
            x_XD = self._dispatch_rest(in_flight, plan, route)
            if c + 1 < N:
                in_flight = self._begin(x_src.index_select(0, send_index[c + 1]), plan, plan.routes[c + 1].stages[0],
                                        reverse=False)
            offsets_L1 = torch.tensor([0, *accumulate(route.local_rows)], device=device)
            y_XD = experts(x_XD, offsets_L1)
            last = route.stages[-1]
            y_XD = y_XD.index_select(0, plan.gather_index(route.expert_blocks, last.recv_blocks, device))
            combines.append(self._begin(y_XD, plan, last, reverse=True))
        for c, route in enumerate(plan.routes):
            outputs.append(self._combine_rest(combines[c], plan, route))
            places.append(send_index[c])
        rows = plan.rows(plan.source_blocks)
        return x_src.new_zeros(rows, x_src.shape[1]).index_copy(0, torch.cat(places), torch.cat(outputs))

    def _dispatch_rest(self, in_flight, plan: ExchangePlan, route) -> Tensor:
        """Wait for the first stage, run the others, and order the rows by local expert."""
        rows = self._end(in_flight)
        device = rows.device
        for before, stage in zip(route.stages, route.stages[1:], strict=False):
            rows = rows.index_select(0, plan.gather_index(before.recv_blocks, stage.send_blocks, device))
            rows = self._end(self._begin(rows, plan, stage, reverse=False))
        return rows.index_select(0, plan.gather_index(route.stages[-1].recv_blocks, route.expert_blocks, device))

    def _combine_rest(self, in_flight, plan: ExchangePlan, route) -> Tensor:
        """Wait for the last stage's way back, run the others back: rows in the first stage's send order."""
        rows = self._end(in_flight)
        device = rows.device
        stages = route.stages
        for k in range(len(stages) - 2, -1, -1):
            rows = rows.index_select(0, plan.gather_index(stages[k + 1].send_blocks, stages[k].recv_blocks, device))
            rows = self._end(self._begin(rows, plan, stages[k], reverse=True))
        return rows

    def _begin(self, x: Tensor, plan: ExchangePlan, stage: Stage, reverse: bool):
        send, recv = plan.splits(stage)
        in_splits, out_splits = (recv, send) if reverse else (send, recv)
        group = getattr(self.groups, stage.group)
        if self.chunks == 1:  # nothing to overlap with: the synchronous op (a graph node for export)
            return torch.ops.moefx.all_to_all(x, out_splits, in_splits, group.group_name), None
        buffer, pending = async_exchange.start(x, out_splits, in_splits, group)
        return buffer, (pending, out_splits, in_splits, group)

    @staticmethod
    def _end(in_flight) -> Tensor:
        buffer, waiting = in_flight
        return buffer if waiting is None else async_exchange.finish(buffer, *waiting)

    # --- sizes and statistics -----------------------------------------------------------------

    def _gather_counts(self, counts_E: Tensor) -> Tensor:
        """Every rank's rows per expert: ``[P, E]`` on the CPU, the same on every rank."""
        everyone = counts_E.new_empty(self.ep_size * counts_E.shape[0])
        gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
        gather(everyone, counts_E.contiguous(), group=self.groups.ep)  # all_gather_single: torch >= 2.13
        return everyone.view(self.ep_size, -1).cpu()

    @staticmethod
    def _padded(x_SD: Tensor, offsets_E1: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
        """Capacity mode: C rows per expert (its kept rows, then zeros), and each permuted row's place."""
        E, C = offsets_E1.shape[0] - 1, capacity
        row_S = torch.arange(x_SD.shape[0], device=x_SD.device)
        expert_S = torch.searchsorted(offsets_E1[1:], row_S, right=True)  # E for dropped rows
        position_S = torch.where(expert_S < E, expert_S * C + row_S - offsets_E1[expert_S.clamp(max=E - 1)], E * C)
        buffer = x_SD.new_zeros(E * C + 1, x_SD.shape[1]).index_copy(0, position_S, x_SD)[: E * C]
        return buffer, position_S

    @staticmethod
    def _weight_bytes(experts) -> int:
        params = [getattr(experts, name, None) for name in ("in_proj", "out_proj", "in_bias", "out_bias")]
        return sum(p[0].numel() * p.element_size() for p in params if p is not None)

    def _stats(self, plan: ExchangePlan, counts, row_bytes: int, weight_bytes: int) -> ExchangeStats:
        rows, messages, inter = plan.traffic()
        broadcast = sum(weight_bytes * (self.ep_size - 1) for e in plan.shadowed if e // self.local_experts == plan.me)
        saved = 0
        for e in plan.shadowed:  # group-wide, forward and backward
            remote = sum(row[e] for row in counts) - counts[e // self.local_experts][e]
            saved += 4 * remote * row_bytes - 2 * (self.ep_size - 1) * weight_bytes
        return ExchangeStats(bytes_sent=rows * row_bytes + broadcast, messages_sent=messages, inter_node_messages=inter,
                             shadowed_experts=tuple(sorted(plan.shadowed)), shadow_bytes_saved=saved)
