"""The layer features adoption needs, against a slow per-token loop in float64: a router bias
(GPT-OSS), GPT-OSS's clamped SwiGLU, and the sigmoid gate on the shared experts (Qwen2-MoE)."""

from __future__ import annotations

import torch

import moefx
from moefx.layer.activations import ClampedSwiGLU


def _loop(layer: moefx.MoE, x_TD: torch.Tensor) -> torch.Tensor:
    router, experts, act = layer.router, layer.experts, ClampedSwiGLU(1.702, 7.0)
    out = torch.zeros_like(x_TD)
    for t, x in enumerate(x_TD):
        probs = torch.softmax(router.weight @ x + router.bias, dim=-1)
        w, chosen = probs.topk(layer.config.top_k)
        for weight, e in zip(w / w.sum(), chosen):
            gate, up = (experts.in_proj[e] @ x + experts.in_bias[e]).chunk(2)
            out[t] += weight * (experts.out_proj[e] @ act(gate, up) + experts.out_bias[e])
        shared = layer.shared_experts
        gate, up = shared.in_proj(x).chunk(2)
        out[t] += torch.sigmoid(layer.shared_gate.weight @ x) * shared.out_proj(act(gate, up))
    return out


def test_router_bias_clamped_swiglu_and_gated_shared_experts_match_a_loop():
    torch.manual_seed(0)
    layer = moefx.MoE(d_model=12, d_hidden=10, num_experts=5, top_k=2, activation="clamped_swiglu", bias=True,
                      router_bias=True, num_shared_experts=1, shared_expert_gate=True, dtype=torch.float64)
    with torch.no_grad():
        layer.router.bias.normal_()
        layer.experts.in_proj.mul_(8)  # past the clamp limit, so the clamps matter
    x = torch.randn(9, 12, dtype=torch.float64)
    assert torch.allclose(layer(x), _loop(layer, x), rtol=1e-10, atol=1e-12)
    assert set(dict(layer.named_parameters())) >= {"router.bias", "shared_gate.weight"}
