"""Where every row of an expert-parallel exchange goes, worked out on the host from every rank's counts.

Legend: P ranks in the EP group, E experts (L = E/P per rank), N chunks, R ranks per node,
M = P/R nodes.

Rows travel in blocks: block ``(s, e, c)`` is chunk c of the rows that EP rank s sends to expert
e (chunk c of n rows: rows ``[n*c//N, n*(c+1)//N)``). Every rank knows every block's size (the
counts matrix is gathered, or all equal to the capacity), so each rank lists, for each exchange
stage, which blocks it sends to and receives from each member of the stage's group, in one
agreed order, and reorders its rows between stages with one gather. Nothing but rows travels.
The lists are tensors of block ids ``(s*E + e)*N + c`` built with torch ops, not Python tuples:
the plan is host work on every forward, and per-block Python took 1-8 ms a layer at 256 experts.

Flat exchange (one stage over the EP group): rank s sends block (s, e, c) to the owner of e.

Two-level exchange (``ranks_per_node=R``, Tutel's 2DH): rank (n, i) (node n, local index i)

1. within node n, gathers to node-mate (n, j) its rows for the experts of every rank (m, j): the
   node's rows are grouped by destination, one rank per destination local index;
2. across nodes, rank (n, j) sends to (m, j) the rows of node n for the experts of (m, j): one
   message per other node (M-1 = P/R-1), each carrying the rows of R senders.

Step 2 lands every row on its expert's rank: the spread within the destination node happened
in step 1 (a row takes the lane of its destination's local index), so no third step is needed.
The way back runs the stages in reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Block = tuple[int, int, int]  # (source EP rank, expert, chunk)


class Blocks:
    """An ordered list of blocks, as ids ``(s*E + e)*N + c``, cut into consecutive runs (one per
    member of a stage's group: ``runs[k]`` blocks for member k). Iterating gives the blocks as
    ``(s, e, c)`` tuples, ``per_member()`` the runs as tuples of them (for reading and tests)."""

    __slots__ = ("ids", "runs", "E", "N")

    def __init__(self, ids: Tensor, runs: list[int], E: int, N: int) -> None:
        self.ids, self.runs, self.E, self.N = ids.reshape(-1), runs, E, N

    def __len__(self) -> int:
        return self.ids.numel()

    def __iter__(self):
        EN, N = self.E * self.N, self.N
        return iter([(i // EN, i % EN // N, i % N) for i in self.ids.tolist()])

    def per_member(self) -> tuple[tuple[Block, ...], ...]:
        blocks, out, start = list(self), [], 0
        for n in self.runs:
            out.append(tuple(blocks[start : start + n]))
            start += n
        return tuple(out)


@dataclass(frozen=True)
class Stage:
    """One all-to-all: ``send_blocks`` / ``recv_blocks`` hold the blocks sent to / received from
    each member of ``group`` (``"ep"``, ``"node"`` or ``"lane"``), in member order; ``members[k]``
    is the k-th member's EP rank. ``send[k]`` / ``recv[k]``: member k's blocks as tuples."""

    group: str
    members: tuple[int, ...]
    send_blocks: Blocks
    recv_blocks: Blocks

    @property
    def send(self) -> tuple[tuple[Block, ...], ...]:
        return self.send_blocks.per_member()

    @property
    def recv(self) -> tuple[tuple[Block, ...], ...]:
        return self.recv_blocks.per_member()


@dataclass(frozen=True)
class ChunkRoute:
    """How chunk c's rows reach the experts: the stages, and the received blocks in expert order."""

    stages: tuple[Stage, ...]
    expert_blocks: Blocks  # (s, e, c) by local expert, then source
    local_rows: tuple[int, ...]  # rows of each local expert in this chunk (L)


def chunk_rows(n: int, chunk: int, chunks: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of an n-row block that chunk ``chunk`` of ``chunks`` takes."""
    return n * chunk // chunks, n * (chunk + 1) // chunks


class ExchangePlan:
    """The blocks of one forward on EP rank ``me``: ``counts[s][e]`` rows of rank s for expert e
    (in its source buffer, grouped by expert; a ``[P, E]`` list or CPU tensor), ``shadowed``
    experts computed where they are."""

    def __init__(self, counts, me: int, local_experts: int, chunks: int, ranks_per_node: int | None,
                 shadowed: tuple[int, ...] = ()) -> None:
        counts_PE = torch.as_tensor(counts, dtype=torch.int64, device="cpu")
        self.me, self.L, self.N = me, local_experts, chunks
        self.P, self.E = counts_PE.shape
        self.R = ranks_per_node
        self.shadowed = frozenset(shadowed)
        self.counts_PE = counts_PE
        # Block (s, e, c) has rows [n*c//N, n*(c+1)//N) of rank s's n rows for e. This rank only
        # handles blocks from its node's ranks or to its own experts: only those are sized.
        self.sizes_PEN = counts_PE.new_zeros(self.P, self.E, chunks)
        first = me - me % ranks_per_node if ranks_per_node else me
        senders, mine = slice(first, first + (ranks_per_node or 1)), slice(me * self.L, (me + 1) * self.L)
        self.sizes_PEN[senders] = self._chunked(counts_PE[senders])
        self.sizes_PEN[:, mine] = self._chunked(counts_PE[:, mine])
        self._sizes = self.sizes_PEN.view(-1)
        self._keep_E = torch.ones(self.E, dtype=torch.bool)
        if shadowed:
            self._keep_E[list(shadowed)] = False
        self._splits: dict[int, tuple[list[int], list[int]]] = {}
        # The source buffer: this rank's rows by expert, each expert's rows by chunk.
        self.source_blocks = self.source_rows_of(torch.arange(self.E))
        self.routes = tuple(self._route(c) for c in range(chunks))

    def _chunked(self, counts: Tensor) -> Tensor:
        """Each count's rows per chunk: the differences of ``n*c//N`` over c = 0..N."""
        return torch.diff((counts[..., None] * torch.arange(self.N + 1)) // self.N, dim=-1)

    def _ids(self, s, e, c) -> Tensor:
        return (s * self.E + e) * self.N + c

    def source_rows_of(self, experts_X: Tensor) -> Blocks:
        """This rank's blocks of ``experts``, each expert's chunks in order (one run)."""
        ids = self._ids(self.me, experts_X[:, None], torch.arange(self.N)[None, :])
        return Blocks(ids, [ids.numel()], self.E, self.N)

    def size(self, block: Block) -> int:
        s, e, c = block
        lo, hi = chunk_rows(int(self.counts_PE[s, e]), c, self.N)
        return hi - lo

    def splits(self, stage: Stage) -> tuple[list[int], list[int]]:
        """Rows sent to and received from each member of ``stage``'s group (the dispatch way)."""
        if id(stage) not in self._splits:
            self._splits[id(stage)] = (self._run_rows(stage.send_blocks), self._run_rows(stage.recv_blocks))
        return self._splits[id(stage)]

    def _run_rows(self, blocks: Blocks) -> list[int]:
        ends = torch.tensor(blocks.runs, dtype=torch.int64).cumsum(0)
        rows = torch.cat([torch.zeros(1, dtype=torch.int64), self._sizes[blocks.ids].cumsum(0)])
        return (rows[ends] - rows[ends - torch.tensor(blocks.runs)]).tolist()

    def _route(self, c: int) -> ChunkRoute:
        me, P, E, L, N = self.me, self.P, self.E, self.L, self.N
        keep_E, experts = self._keep_E, torch.arange(E)
        mine = experts[me * L : (me + 1) * L]
        mine_kept = mine[keep_E[mine]]
        if self.R is None:  # to each rank j: my blocks of j's experts; from each: theirs of mine
            send = Blocks(self._ids(me, experts[keep_E], c), keep_E.view(P, L).sum(1).tolist(), E, N)
            recv = Blocks(self._ids(torch.arange(P)[:, None], mine_kept[None, :], c), [len(mine_kept)] * P, E, N)
            stages = (Stage("ep", tuple(range(P)), send, recv),)
        else:
            R, M = self.R, P // self.R
            node, lane = divmod(me, R)
            node_ranks = node * R + torch.arange(R)
            experts_MRL = experts.view(M, R, L)  # expert (m*R + j)*L + l: rank m*R + j, node m, lane j
            keep_MRL = keep_E.view(M, R, L)
            # within the node, to lane j: my blocks for the experts of every rank (m, j)
            by_lane = experts_MRL.permute(1, 0, 2)[keep_MRL.permute(1, 0, 2)]
            within_send = Blocks(self._ids(me, by_lane, c), keep_MRL.sum((0, 2)).tolist(), E, N)
            lane_E = experts_MRL[:, lane, :][keep_MRL[:, lane, :]]  # the kept experts of my lane, by node
            within_recv = Blocks(self._ids(node_ranks[:, None], lane_E[None, :], c), [len(lane_E)] * R, E, N)
            within = Stage("node", tuple(node_ranks.tolist()), within_send, within_recv)
            # across nodes, to (m, lane): the node's blocks for the experts of (m, lane)
            e_MRL = experts_MRL[:, lane, None, :].expand(M, R, L)
            keep = keep_MRL[:, lane, None, :].expand(M, R, L)
            across_ids = self._ids(node_ranks[None, :, None], e_MRL, c)[keep]
            across_send = Blocks(across_ids, (keep.sum((1, 2))).tolist(), E, N)
            s_MR = torch.arange(P).view(M, R)
            across_recv = Blocks(self._ids(s_MR[:, :, None], mine_kept[None, None, :], c), [R * len(mine_kept)] * M, E, N)
            across = Stage("lane", tuple(m * R + lane for m in range(M)), across_send, across_recv)
            stages = (within, across)
        expert_ids = self._ids(torch.arange(P)[None, :], mine_kept[:, None], c)
        expert_blocks = Blocks(expert_ids, [expert_ids.numel()], E, N)
        local_rows = tuple((self.sizes_PEN[:, mine, c].sum(0) * keep_E[mine]).tolist())
        return ChunkRoute(stages, expert_blocks, local_rows)

    def rows(self, blocks) -> int:
        if isinstance(blocks, Blocks):
            return int(self._sizes[blocks.ids].sum())
        return sum(self.size(b) for b in blocks)

    def _as_ids(self, blocks) -> Tensor:
        if isinstance(blocks, Blocks):
            return blocks.ids
        return self._ids(*torch.tensor(list(blocks), dtype=torch.int64).reshape(-1, 3).unbind(1))

    def gather_index(self, have, want, device) -> Tensor:
        """Row index into a buffer laid out as ``have`` that gives the rows of ``want``, in order
        (``Blocks``, or sequences of block tuples)."""
        have_ids, want_ids = self._as_ids(have), self._as_ids(want)
        have_len = self._sizes[have_ids]
        start = torch.empty_like(self._sizes)
        start[have_ids] = torch.cumsum(have_len, 0) - have_len  # each block's first row in have
        starts, lengths = start[want_ids], self._sizes[want_ids]
        total, first_S = int(lengths.sum()), torch.cumsum(lengths, 0) - lengths  # each block's first row in want
        shift = starts - first_S  # for each row of a block: its place in have minus its place in want
        # Row r's shift is its block's: a running sum of the changes at block starts. (Not
        # repeat_interleave: on CPU with 2+ threads on a busy machine it took ~20 ms a call.)
        jumps = torch.zeros(total + 1, dtype=torch.int64)
        jumps.index_add_(0, first_S, torch.diff(shift, prepend=shift.new_zeros(1)))
        index = torch.cumsum(jumps[:total], 0) + torch.arange(total)
        return index.to(device)

    def traffic(self) -> tuple[int, int, int | None]:
        """Rows and messages this rank sends to other ranks in one forward (dispatch and combine:
        the combine sends back what the dispatch received), and how many of the messages cross
        nodes (None without ``ranks_per_node``)."""
        rows = messages = inter = 0
        for route in self.routes:
            for stage in route.stages:
                send, recv = self.splits(stage)
                for k, member in enumerate(stage.members):
                    if member == self.me:
                        continue
                    for n in (send[k], recv[k]):
                        rows += n
                        messages += n > 0
                        inter += n > 0 and self.R is not None and member // self.R != self.me // self.R
        return rows, messages, (inter if self.R is not None else None)
