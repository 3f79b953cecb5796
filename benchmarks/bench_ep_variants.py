"""Step time and bytes sent of parallelize's exchange variants, over several fresh torchrun launches.

    python benchmarks/bench_ep_variants.py --nproc 4 --launches 5 [--tokens 2048] [--d 256] [--h 512]
        [--experts 8] [--top-k 2] [--repeats 7] [--skew 1.0] [--ranks-per-node 2]

Each launch (``torchrun --standalone``, gloo) builds one MoE layer per variant from the same weights
and times forward+backward on each rank's own tokens, variants interleaved step by step:

    local         every expert in the process, no exchange: the compute alone (a calibration point)
    plain         the all-to-all dispatcher (one synchronous exchange per direction)
    overlap2/4    overlap_chunks=2/4
    hierarchical  ranks_per_node=R (default nproc/2: two "nodes")
    shadowing     shadowing=True (the default ShadowingCostModel)
    all           overlap_chunks=2, ranks_per_node=R, shadowing=True

A step's time is the slowest rank's median; the figure printed is the median over launches, with
the spread (min-max) over launches. Bytes: what each rank sends to other ranks per step (the
forward's ``layer.stats().exchange.bytes_sent``, twice: the backward sends as much back), the
mean over ranks. ``--skew`` biases one router row (inputs have mean 1 per feature, so its logit
rises by about 4*skew): at 1 that expert is nearly every token's first choice (a hot expert,
what shadowing is for); 0 routes at random.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("local", "plain", "overlap2", "overlap4", "hierarchical", "shadowing", "all")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--launches", type=int, default=5, help="fresh torchrun launches")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--h", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skew", type=float, default=1.0)
    p.add_argument("--ranks-per-node", type=int, help="for hierarchical and all (default nproc/2)")
    p.add_argument("--host-plan", action="store_true",
                   help="only time the scheduled dispatcher's host plan at EP 8/64/256 (one process, no torchrun)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import moefx
    from moefx.layer.dispatch import ExchangeStats

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    R = args.ranks_per_node or max(world // 2, 1)
    options = {"plain": {}, "overlap2": {"overlap_chunks": 2}, "overlap4": {"overlap_chunks": 4},
               "hierarchical": {"ranks_per_node": R}, "shadowing": {"shadowing": True},
               "all": {"overlap_chunks": 2, "ranks_per_node": R, "shadowing": True}}
    torch.manual_seed(0)
    base = moefx.MoE(d_model=args.d, d_hidden=args.h, num_experts=args.experts, top_k=args.top_k)
    with torch.no_grad():  # inputs have mean 1 per feature, so this shifts expert 0's logit by ~4*skew
        base.router.weight[0] += 4 * args.skew / args.d
    mesh = moefx.expert_parallel_mesh(ep_size=world)
    layers = {name: moefx.parallelize(copy.deepcopy(base), mesh, data_parallel=False, **options[name])
              for name in VARIANTS if name != "local"}
    layers["local"] = copy.deepcopy(base)
    layers["local"].fused_experts = False  # the permuted path, as the expert-parallel layers run it
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.d, generator=g) + 1.0
    grad = torch.randn(args.tokens, args.d, generator=g)
    times = {name: [] for name in VARIANTS}
    for i in range(args.warmup + args.repeats):
        for name, layer in layers.items():
            dist.barrier()
            start = time.perf_counter()
            layer(x).backward(grad)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    stats = {name: layer.stats().exchange for name, layer in layers.items()}
    stats["plain"] = stats["overlap2"]  # the same rows as one exchange (the plain dispatcher keeps no byte count)
    stats["local"] = ExchangeStats(0, 0, None)
    mine = {name: {"ms": statistics.median(times[name]) * 1e3, "bytes": 2 * stats[name].bytes_sent,
                   "shadowed": list(stats[name].shadowed_experts), "inter": stats[name].inter_node_messages}
            for name in VARIANTS}
    mine["load"] = layers["local"].stats().tokens_per_expert.tolist()  # this rank's copies per expert
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        step = {name: max(r[name]["ms"] for r in everyone) for name in VARIANTS}
        sent = {name: statistics.mean(r[name]["bytes"] for r in everyone) for name in VARIANTS}
        load = [sum(column) for column in zip(*(r["load"] for r in everyone), strict=True)]
        print("RESULT " + json.dumps({"ms": step, "bytes": sent, "shadowed": everyone[0]["shadowing"]["shadowed"],
                                      "hot_share": max(load) / sum(load), "loads": [r["load"] for r in everyone],
                                      "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    dist.destroy_process_group()


def host_plan() -> None:
    """The host work of one forward's plan, as ScheduledDispatcher does it: the plan, every row
    index (dispatch and combine, every stage), the traffic count. Random counts; the median and the
    minimum of 11 (on a shared machine the minimum is the work itself, the median adds the waits)."""
    import random

    import torch

    from moefx.parallel.exchange_plan import ExchangePlan

    print(f"{'EP':>4} {'experts':>7} {'chunks':>6} {'ranks/node':>10} {'ms per layer forward: median':>29} {'min':>6}")
    for ep, experts in ((8, 8), (8, 256), (64, 256), (256, 256)):
        for chunks, ranks_per_node in ((1, None), (2, None), (1, 8), (2, 8)):
            times = []
            for _ in range(11):
                counts = torch.tensor([[random.randint(0, 64) for _ in range(experts)] for _ in range(ep)])
                start = time.perf_counter()  # (the dispatcher gets the counts as a tensor, from its all-gather)
                plan = ExchangePlan(counts, 1, experts // ep, chunks, ranks_per_node)
                for route in plan.routes:
                    stages = route.stages
                    plan.gather_index(plan.source_blocks, stages[0].send_blocks, "cpu")
                    for before, after in zip(stages, stages[1:], strict=False):
                        plan.gather_index(before.recv_blocks, after.send_blocks, "cpu")
                        plan.gather_index(after.send_blocks, before.recv_blocks, "cpu")
                    plan.gather_index(stages[-1].recv_blocks, route.expert_blocks, "cpu")
                    plan.gather_index(route.expert_blocks, stages[-1].recv_blocks, "cpu")
                    for stage in stages:
                        plan.splits(stage)
                plan.traffic()
                times.append(time.perf_counter() - start)
            print(f"{ep:>4} {experts:>7} {chunks:>6} {ranks_per_node or '-':>10} {statistics.median(times) * 1e3:29.2f} "
                  f"{min(times) * 1e3:6.2f}")


def main() -> None:
    args = parse_args()
    if args.host_plan:
        host_plan()
        return
    if args.worker:
        worker(argparse.Namespace(**json.loads(os.environ["BENCH_EP_VARIANTS_ARGS"])))
        return
    # The options travel in the environment: torchrun's own parser claims abbreviations such as --d.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               __file__, "--worker"]
    results = []
    for _ in range(args.launches):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                   "BENCH_EP_VARIANTS_ARGS": json.dumps(vars(args))})
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"a launch failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    first = results[0]
    print(f"ranks={args.nproc} tokens/rank={args.tokens} d={args.d} h={args.h} E={args.experts} k={args.top_k} "
          f"skew={args.skew} fp32 gloo threads/rank={first['threads']} torch={first['torch']} launches={args.launches}")
    print(f"shadowed experts (shadowing): {first['shadowed']}; the hottest expert's share of the copies: "
          f"{first['hot_share']:.2f}")
    print(f"copies per (rank, expert): {first.get('loads')}")
    print(f"{'variant':<14} {'step ms (median)':>16} {'spread (min-max)':>18} {'MiB sent/rank/step':>19}")
    for name in VARIANTS:
        ms = [r["ms"][name] for r in results]
        print(f"{name:<14} {statistics.median(ms):16.1f} {min(ms):8.1f}-{max(ms):<9.1f} "
              f"{first['bytes'][name] / 2**20:19.2f}")


if __name__ == "__main__":
    main()
