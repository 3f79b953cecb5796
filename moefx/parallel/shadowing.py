"""Dynamic shadowing (FasterMoE, He et al., PPoPP 2022): replicate a hot expert for one step
instead of sending it a crowd of tokens.

Legend: P ranks in the EP group, E experts, L = E/P per rank, n[s][e] rows of rank s for expert
e in this forward (every rank has the same matrix: it was gathered).

The cost model: a step of the layer (forward and backward) on the slowest rank, for a set X of
shadowed experts,

    cost(X) = 3 * max_r compute_r * flops_per_row / flop_rate     backward ~2x forward
            + 4 * max_r max(out_r, in_r) * row_bytes / link        dispatch and combine, forward and backward
            + 2 * |X| * weight_bytes / link                         broadcast the weights, reduce their gradients

where compute_r counts the rows rank r computes (all rows of its experts not in X, its own rows
of those in X) and out_r / in_r the rows it sends to / receives from other ranks (experts not in
X). Greedy, as FasterMoE: take the experts by falling load, shadow each while that lowers the
cost, stop at the first that does not. Under uniform routing nothing is shadowed (each replica
moves work to ranks that are as busy as the owner); a hot expert is, once its rows cost more to
move and to compute on one rank than its weights cost to broadcast.

``link`` is the bandwidth one rank sees to the others and ``flop_rate`` what one rank sustains
on the experts (set both for the hardware: ``ShadowingCostModel(link_bytes_per_s=...,
flops_per_s=...)``). The decision uses only the gathered matrix and the layer's shapes, in a
fixed order, so every rank takes the same one.

Dropless only: in capacity mode (``capacity_factor`` set, and always with gate="expert_choice")
every rank sends and computes C rows per expert whatever the routing (the padding), so no expert
is hot on the wire; fed those equal loads the model above shadows nothing (each replica moves
work onto ranks as busy as the owner), so there ``shadowing`` is a no-op, not an error.

Replicas: the owner broadcasts the expert's weights to the EP group; each rank computes its own
rows with them; their gradients are summed back onto the owner with ``reduce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ShadowingCostModel:
    """What ``shadowing`` assumes of the hardware. Defaults: one InfiniBand NDR port (400 Gb/s =
    50 GB/s) per rank, and 400 TFLOP/s sustained (about 40% of an H100's dense bf16 peak)."""

    link_bytes_per_s: float = 50e9
    flops_per_s: float = 400e12

    def __post_init__(self) -> None:
        for name in ("link_bytes_per_s", "flops_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"ShadowingCostModel.{name} must be a positive number, got {value!r}")

    def choose(self, counts: list[list[int]], local_experts: int, row_bytes: int, weight_bytes: int,
               flops_per_row: float) -> tuple[int, ...]:
        """The experts to shadow this step, given the gathered rows per (rank, expert)."""
        P, E = len(counts), len(counts[0])
        total = [sum(row[e] for row in counts) for e in range(E)]
        compute = [sum(total[e] for e in range(r * local_experts, (r + 1) * local_experts)) for r in range(P)]
        out = [sum(n for e, n in enumerate(counts[r]) if e // local_experts != r) for r in range(P)]
        into = [sum(total[e] - counts[r][e] for e in range(r * local_experts, (r + 1) * local_experts)) for r in range(P)]

        def cost(shadowed: int) -> float:
            return (3 * max(compute) * flops_per_row / self.flops_per_s
                    + 4 * max(max(o, i) for o, i in zip(out, into, strict=True)) * row_bytes / self.link_bytes_per_s
                    + 2 * shadowed * weight_bytes / self.link_bytes_per_s)

        chosen, best = [], cost(0)
        for e in sorted(range(E), key=lambda e: (-total[e], e)):
            owner = e // local_experts
            for r in range(P):  # every rank computes its own rows of e; only the owner's stay put
                compute[r] += counts[r][e] - (total[e] if r == owner else 0)
                out[r] -= counts[r][e] if r != owner else 0
            into[owner] -= total[e] - counts[owner][e]
            trial = cost(len(chosen) + 1)
            if trial >= best:  # (the arrays now hold the trial; unused past here)
                break
            chosen.append(e)
            best = trial
        return tuple(sorted(chosen))


def as_cost_model(shadowing) -> ShadowingCostModel | None:
    """``parallelize``'s ``shadowing`` option: False, True (the default model) or a model."""
    if shadowing is False or shadowing is None:
        return None
    if shadowing is True:
        return ShadowingCostModel()
    if isinstance(shadowing, ShadowingCostModel):
        return shadowing
    raise TypeError(f"shadowing must be True, False or a moefx.parallel.ShadowingCostModel, got {shadowing!r}")


class _Replicate(torch.autograd.Function):
    """The shadowed experts' weights on every rank: forward broadcasts from each owner, backward
    sums every rank's gradient onto the owner (zeros elsewhere)."""

    @staticmethod
    def forward(ctx, spec, *params):
        experts, owners, me, lo, group = spec
        present = [p for p in params if p is not None]
        widths = [p[0].numel() for p in present]
        flat = present[0].new_empty(len(experts), sum(widths))
        for k, e in enumerate(experts):
            if owners[k] == me:
                flat[k] = torch.cat([p[e - lo].reshape(-1) for p in present])
        works = [dist.broadcast(flat[k], src=dist.get_global_rank(group, owners[k]), group=group, async_op=True)
                 for k in range(len(experts))]
        for work in works:
            work.wait()
        ctx.spec, ctx.widths = spec, widths
        ctx.shapes = [p.shape for p in params if p is not None]
        ctx.present = [p is not None for p in params]
        return tuple(part.reshape(len(experts), *p.shape[1:]) for part, p in zip(flat.split(widths, 1), present, strict=True))

    @staticmethod
    def backward(ctx, *grads):
        experts, owners, me, lo, group = ctx.spec
        flat = torch.cat([g.reshape(len(experts), -1) for g in grads], 1).contiguous()
        works = [dist.reduce(flat[k], dst=dist.get_global_rank(group, owners[k]), group=group, async_op=True)
                 for k in range(len(experts))]
        for work in works:
            work.wait()
        out = [flat.new_zeros(shape) for shape in ctx.shapes]
        for k, e in enumerate(experts):
            if owners[k] == me:
                for grad, part in zip(out, flat[k].split(ctx.widths), strict=True):
                    grad[e - lo] = part.view(grad.shape[1:])
        it = iter(out)
        return (None, *(next(it) if present else None for present in ctx.present))


def shadow_experts(experts_module, x_XD: Tensor, rows: list[int], experts: tuple[int, ...], local_experts: int,
                   me: int, group) -> Tensor:
    """This rank's rows of the shadowed ``experts`` (``rows[k]`` rows of experts[k], in order)
    through replicas of their weights: ``[X, D]``."""
    owners = tuple(e // local_experts for e in experts)
    names = ("in_proj", "out_proj", "in_bias", "out_bias")
    params = [getattr(experts_module, name) for name in names]
    replicas = iter(_Replicate.apply((experts, owners, me, me * local_experts, group), *params))
    w_in, w_out = next(replicas), next(replicas)
    b_in = next(replicas) if params[2] is not None else None
    b_out = next(replicas) if params[3] is not None else None
    offsets_X1 = torch.tensor([0, *accumulate(rows)], dtype=torch.int64, device=x_XD.device)
    h_XH = torch.ops.moefx.grouped_linear(x_XD, w_in, b_in, offsets_X1)
    return torch.ops.moefx.grouped_linear(experts_module.mid(h_XH), w_out, b_out, offsets_X1)
