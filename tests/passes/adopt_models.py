"""Tiny transformers MoE models (random weights) and a hand-written classic MoE, for the adoption tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 64, "max_position_embeddings": 64}


def hf_model(family: str, **overrides) -> nn.Module:
    """A tiny ``family`` causal LM, random weights (router weights too: transformers starts some at 0), eval."""
    import transformers

    config_class, model_class, options = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**SIZES, **options, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.normal_(0.0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"intermediate_size": 48, "num_local_experts": 4,
                                                        "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "intermediate_size": 48, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
        "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
        "head_dim": 8}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"intermediate_size": 16, "num_experts": 8,
                                                  "num_experts_per_tok": 2}),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"intermediate_size": 16, "num_local_experts": 4,
                                                                 "num_experts_per_tok": 2}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {
        "intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "num_key_value_heads": 4}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {"intermediate_size": 16, "num_local_experts": 4,
                                                      "num_experts_per_tok": 2, "head_dim": 8,
                                                      "layer_types": ["full_attention", "full_attention"]}),
}


class ClassicMoE(nn.Module):
    """The textbook MoE: a router linear, softmax, top-k, a ModuleList of expert MLPs, a weighted sum."""

    def __init__(self, d_model: int = 32, d_hidden: int = 48, num_experts: int = 4, top_k: int = 2,
                 renormalize: bool = True) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_model))
            for _ in range(num_experts)
        )

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            w = (weights * (chosen == e)).sum(dim=-1, keepdim=True)
            out = out + w * expert(x)
        return out


class ClassicModel(nn.Module):
    """A small network with a dense FFN and a classic MoE block."""

    def __init__(self, d_model: int = 32, renormalize: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, 64), nn.ReLU(), nn.Linear(64, d_model))
        self.moe = ClassicMoE(d_model, renormalize=renormalize)
        self.head = nn.Linear(d_model, 4)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.ffn(h)
        h = h + self.moe(h)
        return self.head(h)


class IndexedMoE(ClassicMoE):
    """The classic block written the other common way: each expert runs only on its tokens
    (``torch.where`` on the choices, a data-dependent loop), results added with ``index_add_``."""

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(x_TD), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            out.index_add_(0, token, weights[token, slot, None] * expert(x_TD[token]))
        return out.view(x.shape)


class DampedMoE(ClassicMoE):
    """A classic-looking block moefx cannot express: every expert's output is damped by a learned
    per-expert scale the moefx layer has no place for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, len(self.experts)))

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + self.scale[e] * (weights * (chosen == e)).sum(dim=-1, keepdim=True) * expert(x)
        return out
