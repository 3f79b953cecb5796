"""The exchange variants of ``parallelize`` (overlap_chunks, ranks_per_node, shadowing, and all of
them together) against the single-process layer, run by torchrun from test_ep_variants.py:

    torchrun --standalone --nproc_per_node 4 tests/parallel/variants_worker.py variants errors

Float64 on gloo; every rank raises on a mismatch, so the launcher's exit code is the verdict.
Each variant runs dropless and in capacity mode, under skewed routing: two hot experts, and
rank 1's experts chosen by no token.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

import moefx
from moefx.parallel.shadowing import ShadowingCostModel

D = 16

# Tuned so that dropless steps shadow some loaded experts and not others (_check_stats asserts both).
COST_MODEL = ShadowingCostModel(link_bytes_per_s=1e9, flops_per_s=1.4e9)


def _inputs(rank: int, tokens: int, positive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, D, generator=g, dtype=torch.float64)
    return (x.abs() if positive else x), torch.randn(tokens, D, generator=g, dtype=torch.float64)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = _rel_err(got, want)
    if not err <= 1e-9:  # float64: only the order of sums differs
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs from the single-process layer, relative error {err:.3g}")


def _skewed_layer(num_experts: int, capacity_factor, local: int, gate: str = "topk") -> moefx.MoE:
    torch.manual_seed(0)
    layer = moefx.MoE(d_model=D, d_hidden=24, num_experts=num_experts, top_k=2, capacity_factor=capacity_factor,
                      bias=True, dtype=torch.float64, gate=gate)
    with torch.no_grad():  # positive inputs: the sign of a router row decides
        layer.router.weight[local : 2 * local] = -1.0  # rank 1's experts: no token
        layer.router.weight[0] += 0.3  # hot: every token's first choice
        warm = 2 * local + 1 if num_experts > 2 * local else 2  # on rank 2, or rank 0 when there are 2 ranks
        layer.router.weight[warm] += 0.03
    return layer


def _step_cost(loads, shadowed: set[int], local: int, row_bytes: int, weight_bytes: int, flops: int) -> float:
    """The cost model's step time for a set of shadowed experts, counted from scratch row by row."""
    m, P = COST_MODEL, len(loads)
    compute, out, into = [0] * P, [0] * P, [0] * P
    for s in range(P):
        for e, n in enumerate(loads[s]):
            owner = e // local
            worker = s if e in shadowed else owner
            compute[worker] += n
            if worker != s:
                out[s] += n
                into[worker] += n
    return (3 * max(compute) * flops / m.flops_per_s + 4 * max(max(o, i) for o, i in zip(out, into)) * row_bytes
            / m.link_bytes_per_s + 2 * len(shadowed) * weight_bytes / m.link_bytes_per_s)


def _expected_shadowed(loads: list[list[int]], local: int, row_bytes: int, weight_bytes: int, flops: int) -> set[int]:
    """The greedy rule, with every candidate's cost recounted from scratch."""
    total = [sum(row[e] for row in loads) for e in range(len(loads[0]))]
    chosen: set[int] = set()
    for e in sorted(range(len(total)), key=lambda e: (-total[e], e)):
        args = (local, row_bytes, weight_bytes, flops)
        if _step_cost(loads, chosen | {e}, *args) >= _step_cost(loads, chosen, *args):
            break
        chosen.add(e)
    return chosen


def _variants(world: int) -> dict[str, dict]:
    hierarchical = 2 if world == 4 else 1
    return {
        "overlap": {"overlap_chunks": 3},
        "hierarchical": {"ranks_per_node": hierarchical},
        "shadowing": {"shadowing": COST_MODEL},
        "all": {"overlap_chunks": 2, "ranks_per_node": hierarchical, "shadowing": COST_MODEL},
    }


def variants() -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    num_experts, local = 4 * world, 4
    mesh = moefx.expert_parallel_mesh(ep_size=world)
    # Expert choice runs the capacity exchange (each expert takes C tokens of each rank's batch):
    # every variant, shadowing included (a no-op there, see _check_stats), and all of them together.
    for gate, capacity_factor in (("topk", None), ("topk", 1.0), ("expert_choice", 1.0)):
        tokens = [30 if capacity_factor else 25 + 9 * r for r in range(world)]
        base = _skewed_layer(num_experts, capacity_factor, local, gate)
        reference = copy.deepcopy(base)
        want = {}
        loads = []
        for r in range(world):  # the reference sees every rank's tokens; expert grads sum over them
            xr, gr = _inputs(r, tokens[r], positive=True)
            xr.requires_grad_(True)
            yr = reference(xr)
            (yr * gr).sum().backward()
            loads.append(reference.stats().tokens_per_expert.tolist())
            if r == rank:
                want = {"y": yr.detach(), "dx": xr.grad, "router": reference.router.weight.grad.clone(),
                        "dropped": int(reference.stats().dropped)}
            reference.router.weight.grad = None
        if gate == "expert_choice":  # every expert takes C tokens: the skew is in which tokens it takes
            experts_TK = reference.router(_inputs(rank, tokens[rank], positive=True)[0]).experts_TK
            taken_T = (experts_TK < num_experts).sum(1)
            if not (taken_T.min() == 0 and taken_T.max() >= 3):
                raise AssertionError(f"expert choice should skip some tokens and crowd others: {taken_T.tolist()}")
        elif loads[1][local : 2 * local] != [0] * local or min(loads[r][0] for r in range(world)) == 0:
            raise AssertionError(f"the routing is not skewed as meant: {loads}")
        for name, options in _variants(world).items():
            layer = copy.deepcopy(base)
            moefx.parallelize(layer, mesh, data_parallel=False, **options)
            x, g = _inputs(rank, tokens[rank], positive=True)
            x.requires_grad_(True)
            y = layer(x)
            (y * g).sum().backward()
            where = f"{name}, gate={gate}, capacity_factor={capacity_factor}"
            _close(f"output ({where})", y, want["y"])
            _close(f"input gradient ({where})", x.grad, want["dx"])
            _close(f"router gradient ({where})", layer.router.weight.grad, want["router"])
            if int(layer.stats().dropped) != want["dropped"]:
                raise AssertionError(f"rank {rank} ({where}): dropped {int(layer.stats().dropped)}, want {want['dropped']}")
            for param in ("in_proj", "out_proj", "in_bias", "out_bias"):
                ref = getattr(reference.experts, param).grad[rank * local : (rank + 1) * local] / world
                _close(f"{param} gradient ({where})", getattr(layer.experts, param).grad, ref)
            _check_stats(layer, name, options, loads, capacity_factor)


def _check_stats(layer, name, options, loads, capacity_factor) -> None:
    world, rank, local = dist.get_world_size(), dist.get_rank(), 4
    exchange = layer.stats().exchange
    row_bytes = D * 8
    if "shadowing" in options:
        experts = layer.experts
        weight_bytes = sum(getattr(experts, p)[0].numel() * 8 for p in ("in_proj", "out_proj", "in_bias", "out_bias"))
        flops = 2 * (experts.in_proj[0].numel() + experts.out_proj[0].numel())
        if capacity_factor is not None:  # padded to C rows per (rank, expert): nothing is hot on the wire
            if exchange.shadowed_experts:
                raise AssertionError(f"rank {rank} ({name}): capacity mode shadowed {exchange.shadowed_experts}")
            return
        want = _expected_shadowed(loads, local, row_bytes, weight_bytes, flops)
        loaded = {e for e in range(len(loads[0])) if any(row[e] for row in loads)}
        if set(exchange.shadowed_experts) != want or not want or not (loaded - want):
            raise AssertionError(f"rank {rank} ({name}): shadowed {exchange.shadowed_experts}, the rule gives {sorted(want)} "
                                 f"of the loaded {sorted(loaded)} (both sets must be non-empty): loads {loads}")
        # Rows that would have crossed, there and back, forward and backward, less the weights
        # broadcast and their gradients reduced.
        saved = sum(4 * (sum(row[e] for row in loads) - loads[e // local][e]) * row_bytes - 2 * (world - 1) * weight_bytes
                    for e in want)
        if exchange.shadow_bytes_saved != saved:
            raise AssertionError(f"rank {rank} ({name}): shadow_bytes_saved {exchange.shadow_bytes_saved}, want {saved}")
    if name == "overlap" and capacity_factor is None:  # flat exchange: rows out to other ranks' experts and back in
        mine = range(rank * local, (rank + 1) * local)
        sent = sum(n for e, n in enumerate(loads[rank]) if e not in mine)
        received = sum(loads[r][e] for r in range(world) if r != rank for e in mine)
        if exchange.bytes_sent != (sent + received) * row_bytes:
            raise AssertionError(f"rank {rank}: bytes_sent {exchange.bytes_sent}, want {(sent + received) * row_bytes}")
    if name == "hierarchical" and world == 4:  # 2 nodes of 2: one other node, dispatch and combine
        if exchange.inter_node_messages > 2:
            raise AssertionError(f"rank {rank}: {exchange.inter_node_messages} inter-node messages, at most 2 expected")


def ep_by_dp() -> None:
    """EP 2 x DP 2 with every option (two one-rank "nodes" per EP group), token choice dropless and
    expert choice: each rank's output and router gradient, and the expert gradients summed over
    the dp ranks by the hook, as one process."""
    assert dist.get_world_size() == 4, "ep_by_dp runs on 4 ranks"
    mesh = moefx.expert_parallel_mesh(ep_size=2)
    _ep_by_dp(mesh, "topk", None, [25 + 9 * r for r in range(4)])
    _ep_by_dp(mesh, "expert_choice", 1.0, [30] * 4)  # equal token counts in each EP group


def _ep_by_dp(mesh, gate: str, capacity_factor, tokens: list[int]) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    base = _skewed_layer(8, capacity_factor, 4, gate)
    reference = copy.deepcopy(base)
    layer = copy.deepcopy(base)
    moefx.parallelize(layer, mesh, data_parallel=False, overlap_chunks=2, ranks_per_node=1, shadowing=COST_MODEL)
    x, g = _inputs(rank, tokens[rank], positive=True)
    x.requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    for r in range(world):
        xr, gr = _inputs(r, tokens[r], positive=True)
        xr.requires_grad_(True)
        yr = reference(xr)
        (yr * gr).sum().backward()
        if r == rank:
            _close(f"EP x DP output ({gate})", y, yr.detach())
            _close(f"EP x DP input gradient ({gate})", x.grad, xr.grad)
            _close(f"EP x DP router gradient ({gate})", layer.router.weight.grad, reference.router.weight.grad)
        reference.router.weight.grad = None
    j = mesh["ep"].get_local_rank()
    for param in ("in_proj", "out_proj", "in_bias", "out_bias"):
        _close(f"EP x DP {param} gradient ({gate})", getattr(layer.experts, param).grad,
               getattr(reference.experts, param).grad[j * 4 : (j + 1) * 4] / world)
    shadowed = layer.stats().exchange.shadowed_experts
    if bool(shadowed) != (capacity_factor is None):  # capacity mode: equal loads, nothing to shadow
        raise AssertionError(f"EP x DP, gate={gate}: shadowed {shadowed}; the replicas' gradients need some (dropless)")


def errors() -> None:
    """Bad options raise a clear error on every rank, before any exchange."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = moefx.expert_parallel_mesh(ep_size=world)
    cases = [
        ({"ranks_per_node": 3}, ValueError, f"ranks_per_node=3 does not divide the EP size {world}"),
        ({"ranks_per_node": 0}, ValueError, "ranks_per_node must be a positive integer"),
        ({"overlap_chunks": 0}, ValueError, "overlap_chunks must be a positive integer"),
        ({"shadowing": "yes"}, TypeError, "shadowing must be True, False or a moefx.parallel.ShadowingCostModel"),
        ({"overlap_chunks": 2 + (rank > 0)}, ValueError, "ranks differ in parallelize's options"),
    ]
    for options, kind, words in cases:
        layer = moefx.MoE(d_model=D, d_hidden=24, num_experts=2 * world, top_k=1)
        try:
            moefx.parallelize(layer, mesh, data_parallel=False, **options)
        except kind as err:
            if words not in str(err):
                raise AssertionError(f"rank {rank}, {options}: unexpected message {err}") from err
        else:
            raise AssertionError(f"rank {rank}, {options}: no error")
    # Expert choice with unequal token counts: the error names the gate and a fix that works for it
    # (the token-choice hint, capacity_factor=None, does not: expert choice always has a capacity).
    for options in ({}, {"overlap_chunks": 2}):
        layer = moefx.MoE(d_model=D, d_hidden=24, num_experts=2 * world, top_k=1, gate="expert_choice")
        moefx.parallelize(layer, mesh, data_parallel=False, **options)
        try:
            layer(torch.randn(12 + rank, D))
        except ValueError as err:
            words = ("gate='expert_choice' with expert parallelism needs the same number of tokens",
                     f"from 12 to {11 + world} (this rank {12 + rank})", "same batch size and sequence length")
            if not all(w in str(err) for w in words) or "use capacity_factor=None" in str(err):
                raise AssertionError(f"rank {rank}, expert choice {options}: unexpected message {err}") from err
        else:
            raise AssertionError(f"rank {rank}, expert choice {options}: unequal token counts ran")
    try:
        ShadowingCostModel(link_bytes_per_s=0)
    except ValueError as err:
        assert "link_bytes_per_s must be a positive number" in str(err), err
    else:
        raise AssertionError("a zero bandwidth was accepted")
    dist.barrier()


SCENARIOS = {"variants": variants, "errors": errors, "ep_by_dp": ep_by_dp}

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for spec in sys.argv[1:]:
            SCENARIOS[spec]()
            print(f"rank {dist.get_rank()}: {spec} ok", flush=True)
    finally:
        dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)  # as worker.py: skip gloo's teardown, which can abort after the work is done
