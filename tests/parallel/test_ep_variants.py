"""parallelize's exchange variants: overlap_chunks, ranks_per_node, shadowing, and all together.

The torchrun launches compare each variant with the single-process layer in float64 (outputs,
input, router and expert gradients, dropped counts; dropless and capacity mode, skewed routing);
the plan test moves block labels through every rank's stages in one process, at sizes no CPU
launch reaches (8 ranks, 2 and 4 per node).
"""

from __future__ import annotations

import random
import re

import pytest

from moefx.parallel.exchange_plan import ExchangePlan
from moefx.parallel.shadowing import ShadowingCostModel
from tests.parallel.test_expert_parallel import ROOT, _losses, torchrun

WORKER = ROOT / "tests" / "parallel" / "variants_worker.py"
EXAMPLE = ROOT / "examples" / "train_ep.py"


@pytest.mark.parametrize("nproc", [2, 4])
def test_every_variant_equals_the_single_process_layer(nproc):
    specs = ("variants", "errors", "ep_by_dp") if nproc == 4 else ("variants", "errors")
    out = torchrun(nproc, WORKER, *specs, timeout=400)
    for spec in specs:
        assert out.count(f": {spec} ok") == nproc, out


def test_training_with_every_exchange_option_equals_the_plain_exchange():
    """examples/train_ep.py, 3 SGD steps in float64 at EP 4: overlap_chunks=2, two nodes of 2 and
    shadowing (a cost model where compute dominates, so hot experts get shadowed) print the losses
    of the plain exchange; the replicas' gradients, reduced onto their owners, steer later steps."""
    common = ("--steps", "3", "--dtype", "float64", "--experts", "8")
    plain = _losses(torchrun(4, EXAMPLE, *common))
    out = torchrun(4, EXAMPLE, *common, "--overlap-chunks", "2", "--ranks-per-node", "2", "--shadowing",
                   "--link-bytes-per-s", "1e12", "--flops-per-s", "1e6")
    faster = _losses(out)
    assert len(plain) == len(faster) == 3, out
    for step, (a, b) in enumerate(zip(faster, plain, strict=True)):
        assert abs(a - b) <= 1e-9 * abs(b), f"step {step}: loss {a} with every option, {b} plain"
    shadowed = re.search(r"shadowed: (\d+) layer-steps", out)
    assert shadowed and int(shadowed.group(1)) > 0, out  # else shadowing's gradients went untested


def _simulate(P: int, L: int, R: int | None, N: int, shadowed: tuple[int, ...]):
    """Run every rank's plan with block labels instead of rows; return what each rank's experts see
    and its plan."""
    rng = random.Random(P * 100 + (R or 0) * 10 + N)
    counts = [[rng.choice([0, 0, 1, 3, 7]) for _ in range(P * L)] for _ in range(P)]
    plans = [ExchangePlan(counts, me, L, N, R, shadowed) for me in range(P)]
    seen = {me: [] for me in range(P)}
    for c in range(N):
        # buffers[me]: the labelled rows rank me holds, in its own order
        buffers = {me: [(b, i) for blocks in plans[me].routes[c].stages[0].send for b in blocks
                        for i in range(plans[me].size(b))] for me in range(P)}
        for k in range(len(plans[0].routes[c].stages)):
            received = {}
            for me in range(P):
                stage = plans[me].routes[c].stages[k]
                rows = buffers[me]
                start = 0
                for j, member in enumerate(stage.members):  # what me sends to member j
                    n = plans[me].rows(stage.send[j])
                    received.setdefault(member, {})[me] = rows[start : start + n]
                    start += n
                assert start == len(rows)
            for me in range(P):
                stage = plans[me].routes[c].stages[k]
                got = [row for member in stage.members for row in received[me][member]]
                want = [(b, i) for blocks in stage.recv for b in blocks for i in range(plans[me].size(b))]
                assert got == want, (me, k)  # every rank agrees on what arrives, and in which order
                nxt = plans[me].routes[c].stages[k + 1] if k + 1 < len(plans[me].routes[c].stages) else None
                order = ([(b, i) for blocks in nxt.send for b in blocks for i in range(plans[me].size(b))] if nxt
                         else [(b, i) for b in plans[me].routes[c].expert_blocks for i in range(plans[me].size(b))])
                assert sorted(order) == sorted(got)  # the next stage sends exactly what arrived
                buffers[me] = order
        for me in range(P):
            seen[me] += buffers[me]
    return counts, plans, seen


@pytest.mark.parametrize("P,L,R,N,shadowed", [(8, 2, None, 1, ()), (8, 2, 2, 3, ()), (8, 1, 4, 2, (0, 5)),
                                              (4, 3, 2, 2, (1,)), (8, 2, 8, 1, ()), (8, 2, 1, 2, ())])
def test_every_row_reaches_its_experts_rank_once(P, L, R, N, shadowed):
    counts, plans, seen = _simulate(P, L, R, N, shadowed)
    for me in range(P):
        want = sorted(((s, e, c), i) for s in range(P) for e in range(me * L, (me + 1) * L) if e not in shadowed
                      for c in range(N) for i in range(plans[0].size((s, e, c))))
        assert sorted(seen[me]) == want
        assert sum(n for row in counts for n in row) > 0


@pytest.mark.parametrize("P,L,R,N,shadowed", [(8, 2, None, 2, ()), (8, 1, 4, 3, (0, 5)), (4, 3, 2, 2, (1,))])
def test_row_indices_match_a_row_by_row_reference(P, L, R, N, shadowed):
    """gather_index (tensor block ids, sizes only where this rank reads them) against labels of
    every row, each block sized by chunk_rows from the counts."""
    _, plans, _ = _simulate(P, L, R, N, shadowed)
    checked = 0
    for plan in plans:
        for route in plan.routes:
            buffers = [plan.source_blocks, *(b for st in route.stages for b in (st.send_blocks, st.recv_blocks)),
                       route.expert_blocks]
            for have, want in zip(buffers, buffers[1:]):
                for a, b in ((have, want), (want, have)):
                    if not set(b) <= set(a):  # a stage's own send and recv: no gather between them
                        continue
                    labels = [(blk, i) for blk in a for i in range(plan.size(blk))]
                    place = {label: k for k, label in enumerate(labels)}
                    reference = [place[(blk, i)] for blk in b for i in range(plan.size(blk))]
                    assert plan.gather_index(a, b, "cpu").tolist() == reference
                    assert plan.rows(b) == len(reference)
                    checked += len(reference)
    assert checked > 0


@pytest.mark.parametrize("R", [2, 4])
def test_two_level_exchange_sends_one_message_per_other_node(R):
    P, L = 8, 2
    counts = [[5] * (P * L) for _ in range(P)]
    for me in range(P):
        flat = ExchangePlan(counts, me, L, 1, None).routes[0].stages
        two = ExchangePlan(counts, me, L, 1, R).routes[0].stages
        crossing = sum(1 for m in two[1].members if m != me)
        assert crossing == P // R - 1 and len(flat[0].members) - 1 == P - 1
        rows_out = sum(ExchangePlan(counts, me, L, 1, R).rows(b) for b, m in zip(two[1].send, two[1].members) if m != me)
        assert rows_out == (P // R - 1) * R * L * 5  # each message carries the rows of the node's R ranks


def test_cost_model_shadows_where_the_weights_are_cheaper_than_the_tokens():
    model = ShadowingCostModel(link_bytes_per_s=1e9, flops_per_s=1e30)  # compute free: bytes decide
    # 2 ranks, 2 experts each; expert 1 (rank 0's) gets 100 rows from rank 1, expert 2 (rank 1's) 10 from rank 0.
    # Row 100 B, weights 2000 B. Cost in bytes: 4 * max over ranks of max(rows out, rows in) * 100 + 2 * |X| * 2000.
    # None: 4*100*100 = 40000; {1}: 4*10*100 + 4000 = 8000; {1, 2}: 0 + 8000, not lower: stop.
    counts = [[0, 1, 10, 0], [0, 100, 1, 0]]
    assert model.choose(counts, 2, row_bytes=100, weight_bytes=2000, flops_per_row=1.0) == (1,)
    # 11 rows to move: 4400 against 4000 for the weights
    assert model.choose([[0, 0, 11, 0], [0, 0, 0, 0]], 2, 100, 2000, 1.0) == (2,)
    assert model.choose([[0, 0, 9, 0], [0, 0, 0, 0]], 2, 100, 2000, 1.0) == ()
    # Uniform routing: a replica moves work onto ranks as busy as the owner; nothing is shadowed,
    # however cheap the weights and slow the compute.
    uniform = [[50] * 8 for _ in range(4)]
    assert ShadowingCostModel(link_bytes_per_s=1e12, flops_per_s=1e6).choose(uniform, 2, 100, 1, 1.0) == ()
    # Capacity mode (and expert choice) sends C rows per (rank, expert): equal loads, so shadowing
    # is a no-op there whatever the hardware (README's claim).
    for link, flops in ((1e15, 1e3), (1e3, 1e15), (1e9, 1e9)):
        for P, L in ((2, 4), (4, 2), (8, 1)):
            assert ShadowingCostModel(link, flops).choose([[7] * (P * L)] * P, L, 100, 10, 1.0) == ()
    with pytest.raises(ValueError, match="flops_per_s must be a positive number"):
        ShadowingCostModel(flops_per_s=-1)
