"""An all-to-all that runs while other work does, in the forward and in the backward.

``start(x, ...)`` launches ``all_to_all_single(async_op=True)`` and returns the receive buffer (not
yet filled) with a ``Pending``; ``finish(buffer, pending)`` waits and returns the rows. Between
the two, the caller computes (another chunk's experts). Both are autograd Functions, so the
backward overlaps too: ``finish``'s backward launches the reverse exchange of the gradient and
returns at once; ``start``'s backward, which the engine reaches later (after the nodes recorded
between the two in the forward, e.g. the other chunk's experts), waits for it.

Every rank must issue its collectives in one order. The forward's order is the caller's
code; the backward's is the autograd engine's, which orders nodes by their creation, identically
on every rank running the same code (nothing here branches on the data).

Device-agnostic: gloo runs the exchange on its worker threads; NCCL on its stream, and ``wait()``
makes the current stream wait for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class Pending:
    """One exchange in flight, forward and backward: the work handle and the tensors it uses,
    kept alive until the wait."""

    __slots__ = ("work", "keep", "grad_work", "grad_in", "grad_keep")

    def __init__(self) -> None:
        self.work = self.keep = self.grad_work = self.grad_in = self.grad_keep = None


def _launch(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> tuple[Tensor, Tensor, object]:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
    return out, x, work


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pending, out_splits, in_splits, group):
        ctx.pending = pending
        out, pending.keep, pending.work = _launch(x, out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, _placeholder):
        pending = ctx.pending  # _Finish's backward launched the reverse exchange: wait for it here
        pending.grad_work.wait()
        grad_in = pending.grad_in
        pending.grad_work = pending.grad_in = pending.grad_keep = None
        return grad_in, None, None, None, None


class _Finish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, pending, out_splits, in_splits, group):
        pending.work.wait()
        pending.work = pending.keep = None
        ctx.pending, ctx.out_splits, ctx.in_splits, ctx.group = pending, out_splits, in_splits, group
        return buffer

    @staticmethod
    def backward(ctx, grad_out):
        pending = ctx.pending
        pending.grad_in, pending.grad_keep, pending.grad_work = _launch(grad_out, ctx.in_splits, ctx.out_splits, ctx.group)
        # The real gradient comes out of _Start's backward (after the wait); this one, of the
        # buffer's shape, only carries the engine to it and is dropped there.
        return grad_out, None, None, None, None


def start(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> tuple[Tensor, Pending]:
    """Launch the exchange of ``x``'s rows (``in_splits`` to each member, ``out_splits`` from each)."""
    pending = Pending()
    return _Start.apply(x, pending, out_splits, in_splits, group), pending


def finish(buffer: Tensor, pending: Pending, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """The received rows, once they are there."""
    return _Finish.apply(buffer, pending, out_splits, in_splits, group)
