"""A cost model of parallelize's exchange variants: step time of one MoE layer (forward and
backward) at 8, 64 and 256 GPUs, calibrated on the gloo figures measured here. Pure Python.

    python benchmarks/ep_cost_model.py              # GPU predictions, and the fit to the gloo runs
    python benchmarks/ep_cost_model.py --tokens 512 # tokens per GPU (default 4096)
    python benchmarks/ep_cost_model.py --no-host    # without the Python plan's host time

Model (per EP rank; the slowest rank sets the step):

    compute   = 3 * copies * 6*d*h / flop_rate         SwiGLU expert, forward 2*d*2h + 2*h*d per copy, backward ~2x
    exchange  = 4 all-to-alls (dispatch, combine; forward, backward), each
                  flat:         max(intra rows * row_bytes / intra_bw + (R-1) * a_intra,
                                    inter rows * row_bytes / inter_bw + (P-R) * a_inter) + a_coll
                  hierarchical: [node stage: (R-1)/R of the rows over intra_bw, R-1 messages]
                                + [lane stage: the same inter rows over inter_bw, P/R-1 messages] + 2 a_coll
    overhead  = a_coll (the counts all-gather and its host sync) + host (the plan, scheduled variants)
    overlap N = compute + exchange - eta * (1 - 1/N) * min(compute, exchange) + 4 (N-1) a_coll
    shadowing = the hot expert's rows stay home (computed on every rank), its weights broadcast
                and its gradients reduced: 2 * weight_bytes / link; decided by the first step of
                moefx.parallel.ShadowingCostModel's greedy rule (shadow the hot expert if that lowers the step)

Routing: ``uniform`` (every expert 1/E of the copies) or ``skewed`` (one expert 4/E of them, the
others share the rest). The EP group is min(GPUs, E) ranks (Mixtral's 8 experts: EP 8 inside a
node, the other GPUs data-parallel); R = 8 GPUs per node.

GPU figures (published, cited):
- NVLink 4: 900 GB/s total per H100, 450 GB/s per direction
  (https://www.nvidia.com/en-us/data-center/nvlink/).
- InfiniBand NDR: 400 Gb/s = 50 GB/s per port, one ConnectX-7 port per GPU in a DGX H100
  (https://www.nvidia.com/en-us/networking/quantum2/, https://www.nvidia.com/en-us/data-center/dgx-h100/).
- H100 SXM dense BF16: 989 TFLOP/s peak (https://www.nvidia.com/en-us/data-center/h100/); assumed
  400 TFLOP/s sustained on the grouped GEMMs.
Assumed (not published, not measured here): all-to-alls reach 80% of link bandwidth; 1 us per
message inside a node, 3 us across nodes, 15 us to launch a collective; overlap hides eta = 80%
of what it could (NCCL's kernels take SMs from the GEMMs). Calibrated here: the host time of the
scheduled dispatcher's plan (Python, measured per EP size, experts, chunks and levels: HOST_PLAN_MS)
and, for the gloo fit, flop rate, bandwidth, eta and chunk overhead from the measured runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

VARIANTS = ("plain", "overlap2", "overlap4", "hierarchical", "shadowing", "all")
OPTIONS = {"plain": (1, False, False), "overlap2": (2, False, False), "overlap4": (4, False, False),
           "hierarchical": (1, True, False), "shadowing": (1, False, True), "all": (2, True, True)}


@dataclass(frozen=True)
class Layer:
    name: str
    d: int
    h: int
    experts: int
    top_k: int
    element_bytes: int = 2  # bf16

    @property
    def flops_per_copy(self) -> float:
        return 6 * self.d * self.h

    @property
    def weight_bytes(self) -> int:
        return 3 * self.d * self.h * self.element_bytes


MIXTRAL = Layer("Mixtral-like", 4096, 14336, 8, 2)
DEEPSEEK = Layer("DeepSeek-like", 7168, 2048, 256, 8)


@dataclass(frozen=True)
class Machine:
    flop_rate: float
    intra_bw: float  # per GPU per direction, achieved by an all-to-all
    inter_bw: float
    a_intra: float  # per message
    a_inter: float
    a_coll: float  # per collective
    eta: float  # fraction of min(compute, exchange) that overlap hides
    ranks_per_node: int = 8
    chunk_overhead: float = 0.0  # per extra chunk, beyond its collectives (host work)


H100_CLUSTER = Machine(flop_rate=400e12, intra_bw=0.8 * 450e9, inter_bw=0.8 * 50e9, a_intra=1e-6, a_inter=3e-6,
                       a_coll=15e-6, eta=0.8)

# The scheduled dispatcher's plan on the host (ExchangePlan, every row index, the traffic count;
# one forward, the backward reuses it), ms, the minimum of 11 on this VM's Xeon core (the median
# was 2-5x higher under the other sessions' load): ``python benchmarks/bench_ep_variants.py
# --host-plan``, 2026-12-06. Keys: (EP, experts) -> {(chunks, two-level): ms}.
HOST_PLAN_MS = {
    (8, 8): {(1, False): 0.15, (2, False): 0.28, (1, True): 0.23, (2, True): 0.44},
    (8, 256): {(1, False): 0.82, (2, False): 1.58, (1, True): 1.25, (2, True): 2.56},
    (64, 256): {(1, False): 1.09, (2, False): 2.17, (1, True): 1.57, (2, True): 3.05},
    (256, 256): {(1, False): 2.20, (2, False): 7.86, (1, True): 2.12, (2, True): 7.46},
}


def host_plan_seconds(ep: int, experts: int, chunks: int, two_level: bool) -> float:
    table = HOST_PLAN_MS[(ep, experts)]
    one, two = table[(1, two_level)], table[(2, two_level)]
    return (one + (chunks - 1) * (two - one)) / 1e3  # linear in the chunks beyond the measured two


def _exchange(rows: float, row_bytes: int, ep: int, R: int, m: Machine, two_level: bool) -> float:
    """One all-to-all in one direction for a rank that moves ``rows`` rows to or from other ranks."""
    if ep == 1:
        return 0.0
    R = min(R, ep)
    inter_rows = rows * (ep - R) / (ep - 1)
    if not two_level:
        intra_rows = rows * (R - 1) / (ep - 1)
        return m.a_coll + max(intra_rows * row_bytes / m.intra_bw + (R - 1) * m.a_intra,
                              inter_rows * row_bytes / m.inter_bw + (ep - R) * m.a_inter)
    node_stage = rows * (R - 1) / R * row_bytes / m.intra_bw + (R - 1) * m.a_intra + m.a_coll
    lane_stage = inter_rows * row_bytes / m.inter_bw + (ep // R - 1) * m.a_inter + m.a_coll
    return node_stage + lane_stage


def _loads(layer: Layer, ep: int, tokens: int, hot_share: float, shadowed: bool) -> tuple[float, float]:
    """The slowest rank's expert copies, and its rows in or out (the larger), one all-to-all."""
    E, K, L = layer.experts, layer.top_k, layer.experts // ep
    copies = ep * tokens * K  # in the EP group
    hot, other = hot_share * copies, (1 - hot_share) * copies / (E - 1)  # the hot expert's copies; each other's
    if shadowed:  # every rank computes its own copies of the hot expert; they never travel
        compute = L * other + hot / ep  # a rank that does not own the hot expert
        rows = max(L * other, tokens * K * (1 - hot_share)) * (ep - 1) / ep
    else:  # the hot expert's owner computes all its copies and receives them
        compute = hot + (L - 1) * other
        rows = max(compute, tokens * K) * (ep - 1) / ep
    return compute, rows


def step_seconds(layer: Layer, m: Machine, gpus: int, variant: str, tokens: int, hot_share: float,
                 host_s: float | None = None) -> dict:
    """One layer's forward+backward on the slowest EP rank, and its parts."""
    chunks, two_level, shadow = OPTIONS[variant]
    ep = min(gpus, layer.experts)
    R = min(m.ranks_per_node, ep)
    row_bytes = layer.d * layer.element_bytes
    link = m.inter_bw if ep > R else m.intra_bw

    def parts(shadowed: bool) -> tuple[float, float, float]:
        copies, rows = _loads(layer, ep, tokens, hot_share, shadowed)
        compute = 3 * copies * layer.flops_per_copy / m.flop_rate
        return compute, 4 * _exchange(rows, row_bytes, ep, R, m, two_level), 2 * layer.weight_bytes / link * shadowed

    # ShadowingCostModel's first greedy step, on these parts: shadow the hot expert if it lowers the cost
    shadowed = shadow and ep > 1 and sum(parts(True)) < sum(parts(False))
    compute, exchange, weights = parts(shadowed)
    hidden = m.eta * (1 - 1 / chunks) * min(compute, exchange)
    scheduled = chunks > 1 or two_level or shadow
    host = 0.0
    if scheduled and ep > 1:
        host = host_plan_seconds(ep, layer.experts, chunks, two_level) if host_s is None else host_s
    extra = (chunks - 1) * (4 * m.a_coll * (2 if two_level else 1) + m.chunk_overhead)
    total = compute + exchange + weights - hidden + extra + (m.a_coll if ep > 1 else 0.0) + host
    return {"total": total, "compute": compute, "exchange": exchange, "hidden": hidden, "host": host,
            "shadowed": shadowed, "ep": ep}


# --- calibration on the gloo runs (benchmarks/bench_ep_variants.py, RESULTS.md) ----------------

# Medians over 5 launches, ms per step (slowest rank), MiB sent per rank per step, the experts
# shadowing chose, and the bench's routing: copies per (rank, expert), from its seeds (fp32, 2048
# tokens per rank, d 256, h 512, E 8, k 2). Keys: (ranks, skew). Filled from RESULTS.md.
_ROUTING_NO_SKEW = [[32, 1119, 473, 512, 52, 542, 430, 936], [34, 1127, 466, 467, 61, 563, 448, 930]]
_ROUTING_SKEW_1 = [[2047, 673, 198, 215, 17, 260, 177, 509], [2048, 671, 191, 187, 19, 280, 191, 509]]
MEASURED: dict[tuple[int, float], dict] = {
    (2, 0.0): {"local": 212.1, "plain": 235.6, "overlap2": 236.0, "overlap4": 231.8, "hierarchical": 253.5,
               "shadowing": 226.9, "all": 248.7, "shadowed": [], "loads": _ROUTING_NO_SKEW},
    (2, 1.0): {"local": 292.5, "plain": 377.9, "overlap2": 369.3, "overlap4": 377.5, "hierarchical": 419.6,
               "shadowing": 315.6, "all": 314.2, "shadowed": [0], "loads": _ROUTING_SKEW_1},
    (4, 0.0): {"local": 421.4, "plain": 474.5, "overlap2": 502.6, "overlap4": 491.9, "hierarchical": 564.6,
               "shadowing": 552.7, "all": 524.8, "shadowed": [],
               "loads": _ROUTING_NO_SKEW + [[39, 1141, 469, 495, 51, 549, 448, 904], [41, 1096, 457, 475, 48, 588, 469, 922]]},
    (4, 1.0): {"local": 339.1, "plain": 575.4, "overlap2": 498.3, "overlap4": 445.6, "hierarchical": 616.3,
               "shadowing": 373.7, "all": 395.4, "shadowed": [0],
               "loads": _ROUTING_SKEW_1 + [[2048, 700, 214, 200, 12, 281, 169, 472], [2048, 677, 187, 196, 15, 288, 201, 484]]},
}
BENCH_LAYER = Layer("bench", 256, 512, 8, 2, element_bytes=4)


def _counted(loads: list[list[int]], shadowed: set[int]) -> tuple[int, int]:
    """The slowest rank's copies and its rows out or in (the larger), as ShadowingCostModel counts them."""
    P, L = len(loads), len(loads[0]) // len(loads)
    compute, out, into = [0] * P, [0] * P, [0] * P
    for s in range(P):
        for e, n in enumerate(loads[s]):
            worker = s if e in shadowed else e // L
            compute[worker] += n
            if worker != s:
                out[s], into[worker] = out[s] + n, into[worker] + n
    return max(compute), max(max(o, i) for o, i in zip(out, into, strict=True))


def bench_step(m: Machine, run: dict, variant: str, host: float) -> float:
    """The model on a measured run's own routing (no hot-share idealisation)."""
    chunks, two_level, shadow = OPTIONS[variant]
    loads, layer = run["loads"], BENCH_LAYER
    shadowed = set(run["shadowed"]) if shadow else set()
    copies, rows = _counted(loads, shadowed)
    compute = 3 * copies * layer.flops_per_copy / m.flop_rate
    exchange = 4 * _exchange(rows, layer.d * layer.element_bytes, len(loads), m.ranks_per_node, m, two_level)
    weights = 2 * len(shadowed) * layer.weight_bytes / m.inter_bw
    hidden = m.eta * (1 - 1 / chunks) * min(compute, exchange)
    scheduled = chunks > 1 or two_level or shadow
    return compute + exchange + weights - hidden + (chunks - 1) * m.chunk_overhead + host * scheduled


def fit_gloo() -> tuple[Machine, float]:
    """From the 2-rank run without skew: flop rate from ``local`` (every rank 4096 copies, no
    exchange); bandwidth from ``plain`` minus its compute; the scheduled dispatcher's overhead
    (plan, gathers between stages, extra collectives) from ``hierarchical`` (one-rank "nodes": the
    plain exchange) minus ``plain``; eta and the
    per-chunk overhead from overlap2 and overlap4 (two equations, two unknowns)."""
    got, layer = MEASURED[(2, 0.0)], BENCH_LAYER
    flop_rate = 3 * 2048 * layer.top_k * layer.flops_per_copy / (got["local"] / 1e3)
    copies, rows = _counted(got["loads"], set())
    compute = 3 * copies * layer.flops_per_copy / flop_rate
    exchange = got["plain"] / 1e3 - compute
    bandwidth = 4 * rows * layer.d * layer.element_bytes / exchange
    host = (got["hierarchical"] - got["plain"]) / 1e3
    # plain - overlapN = eta * (1 - 1/N) * min(compute, exchange) - (N - 1) * overhead - host
    a2, a4 = (got["plain"] - got["overlap2"]) / 1e3 + host, (got["plain"] - got["overlap4"]) / 1e3 + host
    overhead = (a2 * 3 / 2 - a4) / (3 - 3 / 2)
    eta = (a2 + overhead) / (min(compute, exchange) / 2)
    if not 0 <= eta <= 1:  # the exchange is a few % of the step here: noise decides; keep eta a fraction
        print(f"(eta fitted as {eta:.2f}: outside [0, 1], the overlap gains are within the noise; clamped)")
        eta = min(max(eta, 0.0), 1.0)
    return Machine(flop_rate, bandwidth, bandwidth, 0.0, 0.0, 0.0, eta, ranks_per_node=1, chunk_overhead=overhead), host


def print_gloo_fit() -> None:
    if (2, 0.0) not in MEASURED:
        return
    m, host = fit_gloo()
    print(f"gloo fit (2 ranks, no skew): flop rate {m.flop_rate / 1e9:.1f} GFLOP/s a rank, bandwidth "
          f"{m.intra_bw / 1e6:.0f} MB/s, eta {m.eta:.2f}, chunk overhead {m.chunk_overhead * 1e3:.1f} ms, "
          f"scheduled-dispatcher overhead {host * 1e3:.1f} ms a step")
    for (ranks, skew), got in MEASURED.items():
        # each run's own compute rate (4 ranks share 2 cores), the rest from the fit
        rate = 3 * 2048 * BENCH_LAYER.top_k * BENCH_LAYER.flops_per_copy / (got["local"] / 1e3)
        machine = replace(m, flop_rate=rate, ranks_per_node=max(ranks // 2, 1))
        print(f"  {ranks} ranks, skew {skew}: " + ", ".join(
            f"{v} {bench_step(machine, got, v, host) * 1e3:.0f}/{got[v]:.0f}" for v in VARIANTS) + " ms (model/measured)")


def print_predictions(tokens: int, host: bool) -> None:
    print(f"\nH100 cluster, {tokens} tokens per GPU, one MoE layer forward+backward, ms (slowest EP rank); "
          + ("with" if host else "without") + " the scheduled dispatcher's host plan")
    print(f"{'layer':<14} {'GPUs':>4} {'EP':>4} {'routing':<8} " + " ".join(f"{v:>12}" for v in VARIANTS)
          + "  shadowed  compute/exchange(plain)")
    for layer in (MIXTRAL, DEEPSEEK):
        for gpus in (8, 64, 256):
            for skewed in (False, True):
                hot_share = 4 / layer.experts if skewed else 1 / layer.experts
                rows = {v: step_seconds(layer, H100_CLUSTER, gpus, v, tokens, hot_share, None if host else 0.0)
                        for v in VARIANTS}
                plain = rows["plain"]
                print(f"{layer.name:<14} {gpus:>4} {plain['ep']:>4} {'skewed' if skewed else 'uniform':<8} "
                      + " ".join(f"{rows[v]['total'] * 1e3:12.2f}" for v in VARIANTS)
                      + f"  {'yes' if rows['shadowing']['shadowed'] else 'no':>8}"
                      + f"  {plain['compute'] * 1e3:.2f}/{plain['exchange'] * 1e3:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per GPU")
    p.add_argument("--no-host", action="store_true", help="leave out the host plan (a vectorised plan's limit)")
    args = p.parse_args()
    print_gloo_fit()
    print_predictions(args.tokens, host=not args.no_host)


if __name__ == "__main__":
    main()
