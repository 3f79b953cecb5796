"""Expert-parallel MoE layer: time per training step and bytes exchanged, under torchrun.

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_ep.py [--tokens 4096] [--d 512]
        [--h 1024] [--experts 8] [--top-k 2] [--repeats 7] [--capacity-factor 1.25]

Every rank runs the same layer on its own tokens in two ways, interleaved step by step:
``local`` keeps every expert in the process (no exchange: the same work as one rank of plain
data parallelism) and ``ep`` keeps E/ep experts and exchanges token copies with all-to-all
(dropless; and with ``--capacity-factor``, the equal-split capacity mode too). It prints the
median forward+backward time and, from the routing, the bytes each rank sent to other ranks per
layer and step: dispatch and combine forward, and the same again backward.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist

import moefx


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, help="also time the capacity (equal-split) mode")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args()


def step_time(layer, x, grad) -> float:
    start = time.perf_counter()
    layer(x).backward(grad)
    return time.perf_counter() - start


def bytes_to_other_ranks(layer, tokens: int, rank: int, ep: int, d: int, element: int) -> int:
    """Rows this rank sent to other ranks, both ways (dispatch, combine), forward and backward."""
    config = layer.config
    local = config.num_experts // ep
    if config.capacity_factor:  # padded: capacity rows per expert, whatever the routing
        remote_rows = (ep - 1) * local * config.capacity(tokens)
    else:
        per_expert = layer.stats().tokens_per_expert
        remote_rows = int(per_expert.sum() - per_expert[rank * local : (rank + 1) * local].sum())
    return remote_rows * d * element * 2 * 2


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    layers = {"local": moefx.MoE(d_model=args.d, d_hidden=args.h, num_experts=args.experts, top_k=args.top_k)}
    mesh = moefx.expert_parallel_mesh(ep_size=world)
    layers["ep"] = moefx.parallelize(copy.deepcopy(layers["local"]), mesh, data_parallel=False)
    if args.capacity_factor:
        capped = moefx.MoE(d_model=args.d, d_hidden=args.h, num_experts=args.experts, top_k=args.top_k,
                           capacity_factor=args.capacity_factor)
        capped.load_state_dict(layers["local"].state_dict())
        layers["ep_capacity"] = moefx.parallelize(capped, mesh, data_parallel=False)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.d, generator=g)
    grad = torch.randn(args.tokens, args.d, generator=g)
    times = {name: [] for name in layers}
    for i in range(args.warmup + args.repeats):
        for name, layer in layers.items():
            dist.barrier()
            elapsed = step_time(layer, x, grad)
            if i >= args.warmup:
                times[name].append(elapsed)
    sent = {name: bytes_to_other_ranks(layer, args.tokens, rank, world, args.d, 4)
            for name, layer in layers.items() if name != "local"}
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    report = [None] * world
    dist.all_gather_object(report, (medians, sent))
    if rank == 0:
        print(f"ranks={world} tokens/rank={args.tokens} d={args.d} h={args.h} E={args.experts} k={args.top_k} "
              f"fp32 threads/rank={torch.get_num_threads()} torch={torch.__version__}")
        print(f"{'impl':<12} {'median ms/step (per rank)':<40} {'MiB sent to other ranks/step (per rank)'}")
        for name in layers:
            ms = " ".join(f"{r[0][name]:8.1f}" for r in report)
            mib = " ".join(f"{r[1][name] / 2**20:8.1f}" for r in report) if name in sent else "       -"
            print(f"{name:<12} {ms:<40} {mib}")
        volume = 2 * args.top_k * args.d * 4
        print(f"all-to-all volume per token and layer, forward: 2·k·d·4 B = {volume} B (x2 with backward)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
