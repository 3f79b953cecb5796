"""The overlapping all-to-all's autograd structure, in one process (a one-rank gloo group, where the
exchange is the identity): gradients are right, and the backward launches a later chunk's reverse
exchange before it waits for an earlier one, so the two can be in flight together."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moefx.parallel import async_exchange


@pytest.fixture()
def one_rank_group():
    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class _LoggedWork:
    def __init__(self, work, rows, events):
        self.work, self.rows, self.events = work, rows, events

    def wait(self):
        self.events.append(("wait", self.rows))
        return self.work.wait()


def test_chunks_overlap_in_forward_and_backward(one_rank_group, monkeypatch):
    events = []
    launch = async_exchange._launch

    def logged(x, out_splits, in_splits, group):
        out, keep, work = launch(x, out_splits, in_splits, group)
        events.append(("launch", x.shape[0]))
        return out, keep, _LoggedWork(work, x.shape[0], events)

    monkeypatch.setattr(async_exchange, "_launch", logged)
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    chunks = [x[:3], x[3:]]  # 3 and 5 rows: the log tells them apart
    ys, pending = [], []
    for c in chunks:  # the dispatcher's schedule: launch every chunk, then compute each as it arrives
        pending.append(async_exchange.start(c, [c.shape[0]], [c.shape[0]], one_rank_group))
    for c, (buffer, p) in zip(chunks, pending, strict=True):
        ys.append(torch.tanh(async_exchange.finish(buffer, p, [c.shape[0]], [c.shape[0]], one_rank_group) @ w))
    assert events == [("launch", 3), ("launch", 5), ("wait", 3), ("wait", 5)]
    events.clear()
    torch.cat(ys).pow(2).sum().backward()

    launches = [i for i, (kind, _) in enumerate(events) if kind == "launch"]
    waits = [i for i, (kind, _) in enumerate(events) if kind == "wait"]
    assert len(launches) == len(waits) == 2
    assert launches[1] < waits[0], f"the backward waited before launching the other chunk: {events}"

    x_ref, w_ref = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    torch.tanh(x_ref @ w_ref).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=0)
