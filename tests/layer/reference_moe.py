"""A slow, obviously-right MoE forward: a loop over tokens and their chosen experts.

It reads the layer's parameters but none of its code paths: routing, capacity, the experts and
the combine are written out from their definitions (MoEConfig and moefx.kernels.ops.permute).
"""

from __future__ import annotations

import math
from decimal import Decimal

import torch
import torch.nn.functional as F


def reference_moe(layer, x):
    c = layer.config
    E, K, H = c.num_experts, c.top_k, c.d_hidden
    x_TD = x.reshape(-1, c.d_model)
    T = x_TD.shape[0]
    logits = F.linear(x_TD.double(), layer.router.weight.double())

    choices = []  # per token: [(expert, weight)] sorted by logit, ties to the lower index
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-logits[t, e].item(), e))[:K]
        if c.softmax_first:
            probs = torch.softmax(logits[t], 0)
            w = [probs[e] for e in order]
            if c.renormalize:
                w = [wi / sum(w) for wi in w]
        else:
            w = list(torch.softmax(torch.stack([logits[t, e] for e in order]), 0))
        choices.append(list(zip(order, w)))

    # Capacity: all first choices in token order, then all second choices, ...
    capacity = None if c.capacity_factor is None else math.ceil(Decimal(repr(c.capacity_factor)) * T * K / E)
    used = [0] * E
    kept = set()
    for k in range(K):
        for t in range(T):
            e = choices[t][k][0]
            if capacity is None or used[e] < capacity:
                used[e] += 1
                kept.add((t, k))

    ex = layer.experts
    act = ex.mid.act
    out = []
    for t in range(T):
        acc = torch.zeros(c.d_model, dtype=x.dtype)
        for k, (e, w) in enumerate(choices[t]):
            if (t, k) not in kept:
                continue
            h = F.linear(x_TD[t], ex.in_proj[e], None if ex.in_bias is None else ex.in_bias[e])
            h = act(h[:H]) * h[H:] if c.gated else act(h)
            y = F.linear(h, ex.out_proj[e], None if ex.out_bias is None else ex.out_bias[e])
            acc = acc + c.routed_scale * w.to(x.dtype) * y
        out.append(acc)
    out = torch.stack(out)
    shared = layer.shared_experts
    if shared is not None:
        h = F.linear(x_TD, shared.in_proj.weight, shared.in_proj.bias)
        width = h.shape[-1] // 2
        h = act(h[:, :width]) * h[:, width:] if c.gated else act(h)
        out = out + F.linear(h, shared.out_proj.weight, shared.out_proj.bias)
    return out.view(x.shape), sorted(kept)
