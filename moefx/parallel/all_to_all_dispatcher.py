"""The expert-parallel dispatcher: each rank of the EP group holds E/ep experts; token copies
travel to the rank of their expert with ``moefx::all_to_all`` and come back the same way.

Legend: T tokens, D model dim, E experts (global), L = E/ep local experts, K top-k, S = T*K
slots, R rows received, C capacity per expert.

Dropless (variable splits)::

    permute (by global expert) ─▶ counts per expert ──all_to_all──▶ counts from each source
    rows [kept] ──all_to_all(splits from the counts)──▶ rows by (source, local expert)
    ─▶ regroup by (local expert, source) ─▶ grouped experts ─▶ back the same way ─▶ unpermute

The split sizes are needed on the host: one device-to-host sync per forward (marked NOTE).

Capacity (equal splits, no sync, for torch.compile and CUDA graphs): every rank sends exactly
C rows per expert (its kept rows, zero-padded), so the splits are ``L*C`` for every rank and
known without looking at the data. Each rank computes C from its own token count, so every
rank must run the same number of tokens per forward (static shapes anyway). In eager mode each
forward checks that with one small all-reduce, so a mismatch is an error on every rank instead of
a collective mismatch (gloo aborts, NCCL hangs); compiled and exported graphs skip the check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)
from moefx.layer.dispatch import Dispatcher, DispatchMeta


@dataclass(frozen=True)
class EPDispatchMeta(DispatchMeta):
    """``DispatchMeta`` with the exchange's sizes. ``row_slot_S``/``slot_row_S`` are the local permute's;
    ``offsets_E1`` are the L local experts' ranges in the received buffer (L + 1 entries), and
    ``permute_offsets_E1`` this rank's token copies per global expert (E + 1)."""

    regroup_R: Tensor | None  # received row i goes to position regroup[i] (dropless)
    send_splits: list[int] | None  # rows sent to each rank (dropless)
    recv_splits: list[int] | None
    kept: int | None  # rows kept by the local permute (dropless)
    position_S: Tensor | None  # capacity: each permuted row's place in the [E*C + 1] send buffer
    capacity: int | None


class AllToAllDispatcher(Dispatcher):
    """Dispatch over the ``ep`` ranks of ``mesh``; this rank holds experts ``[j*L, (j+1)*L)``, j its
    ``ep`` coordinate. The mesh is kept for checkpoints (the experts as shards of a DTensor). Rows
    move between ranks, so it has no plan alone (``fuses_experts`` False: the permuted path)."""

    def __init__(self, mesh: DeviceMesh, num_experts: int, *, gate: str = "topk") -> None:
        self.mesh, self.gate = mesh, gate  # the gate only words the unequal-token-count error
        self.group_name = mesh["ep"].get_group().group_name
        self.ep_size = mesh["ep"].size()
        self.local_experts = num_experts // self.ep_size

    def dispatch(
        self, x_TD: Tensor, experts_TK: Tensor, num_experts: int, capacity: int | None
    ) -> tuple[Tensor, EPDispatchMeta]:
        x_SD, row_slot_S, slot_row_S, offsets_E1 = torch.ops.moefx.permute(x_TD, experts_TK, num_experts, capacity)
        if capacity is None:
            return self._dispatch_dropless(x_SD, row_slot_S, slot_row_S, offsets_E1)
        if not torch.compiler.is_compiling():  # True under torch.compile and torch.export as well
            self._check_equal_token_counts(x_TD)
        return self._dispatch_capacity(x_SD, row_slot_S, slot_row_S, offsets_E1, capacity)

    def combine(self, y_RD: Tensor, weights_TK: Tensor, meta: EPDispatchMeta) -> Tensor:
        S, D = meta.slot_row_S.shape[0], y_RD.shape[1]
        if meta.capacity is None:
            y_RD = y_RD.index_select(0, meta.regroup_R)  # back to (source, local expert) order
            y_kept = torch.ops.moefx.all_to_all(y_RD, meta.send_splits, meta.recv_splits, self.group_name)
            y_SD = torch.cat([y_kept, y_kept.new_zeros(S - meta.kept, D)])
        else:
            L, ep, C = self.local_experts, self.ep_size, meta.capacity
            y_back = y_RD.view(L, ep, C, D).transpose(0, 1).reshape(ep * L * C, D)
            y_back = torch.ops.moefx.all_to_all(y_back, [L * C] * ep, [L * C] * ep, self.group_name)
            y_SD = torch.cat([y_back, y_back.new_zeros(1, D)]).index_select(0, meta.position_S)  # dropped: zeros
        return torch.ops.moefx.unpermute(y_SD, weights_TK, meta.slot_row_S, meta.row_slot_S)

    def _check_equal_token_counts(self, x_TD: Tensor) -> None:
        """Capacity mode's splits are ``L*C`` rows with C from the local token count: unequal counts
        would pair sends and receives of different sizes."""
        tokens = x_TD.shape[0]
        bounds = torch.tensor([tokens, -tokens], device=x_TD.device)
        torch.distributed.all_reduce(bounds, torch.distributed.ReduceOp.MAX, group=self.mesh["ep"].get_group())
        most, negative_fewest = bounds.tolist()  # NOTE: device-to-host sync (eager mode only)
        fewest = -negative_fewest
        if most != fewest and self.gate == "expert_choice":
            raise ValueError(
                f"gate='expert_choice' with expert parallelism needs the same number of tokens on every rank of the "
                f"expert-parallel group in each forward (each expert takes C = ceil(capacity_factor * tokens * top_k / "
                f"num_experts) tokens of every rank's batch, and the exchange sends C rows per expert), but the ranks "
                f"have from {fewest} to {most} (this rank {tokens}): give every rank the same batch size and sequence "
                "length (drop the last, shorter batch, e.g. DataLoader(drop_last=True)); padding tokens would work but "
                "compete for the experts' C slots. capacity_factor=None does not apply: expert choice always has a capacity"
            )
        if most != fewest:
            raise ValueError(
                f"capacity_factor with expert parallelism needs the same number of tokens on every rank of the "
                f"expert-parallel group in each forward, but the ranks have from {fewest} to {most} (this rank {tokens}): "
                "give every rank batches of one shape (pad them), or use capacity_factor=None (dropless), which takes any count"
            )

    def _dispatch_dropless(self, x_SD, row_slot_S, slot_row_S, offsets_E1) -> tuple[Tensor, EPDispatchMeta]:
        L, ep = self.local_experts, self.ep_size
        counts_E = offsets_E1[1:] - offsets_E1[:-1]
        recv_counts = torch.ops.moefx.all_to_all(counts_E, [L] * ep, [L] * ep, self.group_name).view(ep, L)
        # NOTE: device-to-host sync: the row splits of the exchange must be known on the host.
        counts_host = torch.stack([counts_E.view(ep, L).sum(1), recv_counts.sum(1), offsets_E1[-1:].expand(ep)]).tolist()
        send_splits, recv_splits, kept = counts_host[0], counts_host[1], counts_host[2][0]
        x_recv = torch.ops.moefx.all_to_all(x_SD[:kept], recv_splits, send_splits, self.group_name)
        # Received rows come by source rank, then local expert; the experts want them by expert.
        # output_size: the total is already on the host (recv_splits), so this costs no second sync.
        block_R = torch.repeat_interleave(
            torch.arange(ep * L, device=x_SD.device), recv_counts.reshape(-1), output_size=sum(recv_splits)
        )
        expert_major_R = (block_R % L) * ep + block_R // L
        order_R = torch.argsort(expert_major_R, stable=True)  # row of the expert buffer → received row
        regroup_R = torch.empty_like(order_R)  # received row → row of the expert buffer (the inverse)
        regroup_R[order_R] = torch.arange(order_R.numel(), device=x_SD.device)
        local_offsets = torch.zeros(L + 1, dtype=torch.int64, device=x_SD.device)
        torch.cumsum(recv_counts.sum(0), 0, out=local_offsets[1:])
        meta = EPDispatchMeta(
            row_slot_S, slot_row_S, offsets_E1=local_offsets, permute_offsets_E1=offsets_E1, regroup_R=regroup_R,
            send_splits=send_splits, recv_splits=recv_splits, kept=kept, position_S=None, capacity=None,
        )
        return x_recv.index_select(0, order_R), meta

    def _dispatch_capacity(self, x_SD, row_slot_S, slot_row_S, offsets_E1, capacity) -> tuple[Tensor, EPDispatchMeta]:
        L, ep, C, D = self.local_experts, self.ep_size, capacity, x_SD.shape[1]
        E = L * ep
        row_S = torch.arange(x_SD.shape[0], device=x_SD.device)
        expert_S = torch.searchsorted(offsets_E1[1:], row_S, right=True)  # E for dropped rows
        position_S = torch.where(expert_S < E, expert_S * C + row_S - offsets_E1[expert_S.clamp(max=E - 1)], E * C)
        buffer = x_SD.new_zeros(E * C + 1, D).index_copy(0, position_S, x_SD)[: E * C]
        received = torch.ops.moefx.all_to_all(buffer, [L * C] * ep, [L * C] * ep, self.group_name)
        x_RD = received.view(ep, L, C, D).transpose(0, 1).reshape(L * ep * C, D)
        local_offsets = torch.arange(L + 1, device=x_SD.device) * (ep * C)
        meta = EPDispatchMeta(
            row_slot_S, slot_row_S, offsets_E1=local_offsets, permute_offsets_E1=offsets_E1, regroup_R=None,
            send_splits=None, recv_splits=None, kept=None, position_S=position_S, capacity=C,
        )
        return x_RD, meta
