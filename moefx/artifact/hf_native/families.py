"""The native transformers MoE family of each dense family, in one table.

A dense decoder whose FFNs moefx converted is written as the MoE family with the same attention,
norms and embeddings, so that ``AutoModelForCausalLM.from_pretrained(out)`` builds it without
moefx. Each row says how that family names its MoE block on the hub (what transformers 5.25's
``conversion_mapping.py`` reads back), which config fields carry the experts, and what it cannot
express. Every row is verified by a round trip in ``tests/artifact/test_hf_native.py`` (logits
and greedy tokens equal, loaded in a process that never imports moefx).

Pairs checked and left out (their architectures differ, so no renaming makes them equal):
OLMo -> OLMoE and OLMo2 -> OLMoE (OLMoE is pre-norm with a full-width q/k norm; OLMo has no norm
weights, OLMo2 is post-norm: FlexOlmo is OLMo2's MoE), Phi-3 -> PhiMoE (LayerNorm with bias,
SparseMixer routing), GLM-4 -> GLM-4-MoE (no post-norms, sigmoid routing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, kw_only=True)
class Family:
    """One dense -> MoE pair. Names are relative to a decoder layer, ``model.layers.{i}.``."""

    moe_type: str  # the MoE family's config model_type
    architecture: str  # its causal-LM class, written to config.architectures
    experts_field: str  # config field holding the number of experts
    hidden_field: str  # config field holding one expert's hidden size
    block: str  # the MoE block's name in a decoder layer
    router: str  # the router weight under the block
    # Per-expert weights under ``{block}.experts.{e}.`` as (gate, up, down), or None when the
    # family stores the stacks themselves (``stacked``: (gate|up stack, down stack) under the block).
    per_expert: tuple[str, str, str] | None = None
    stacked: tuple[str, str] | None = None
    optional_renormalize: bool = False  # has norm_topk_prob (else top-k weights are always renormalised)
    dense_layers: bool = False  # can leave layers dense (mlp_only_layers, decoder_sparse_step)
    # Always has a sigmoid-gated shared expert (Qwen2-MoE): a layer's own (shared experts with
    # shared_expert_gate, as adoption makes them), or else a zero one that adds exactly 0 (plan.py).
    gated_shared_expert: bool = False
    # Dense config fields the MoE family lacks, with the only value it behaves as.
    requires: dict[str, object] = field(default_factory=dict)
    # Dense config fields dropped once ``requires`` held (the MoE config has no such field).
    drops: tuple[str, ...] = ()


_MIXTRAL = Family(
    moe_type="mixtral", architecture="MixtralForCausalLM", experts_field="num_local_experts",
    hidden_field="intermediate_size", block="block_sparse_moe", router="gate.weight",
    per_expert=("w1.weight", "w3.weight", "w2.weight"),
)
_QWEN_MOE = {  # Qwen2-MoE and Qwen3-MoE name their experts alike
    "experts_field": "num_experts", "hidden_field": "moe_intermediate_size", "block": "mlp", "router": "gate.weight",
    "per_expert": ("gate_proj.weight", "up_proj.weight", "down_proj.weight"), "optional_renormalize": True,
    "dense_layers": True,
}

FAMILIES: dict[str, Family] = {  # dense config model_type -> its MoE family
    "llama": replace(_MIXTRAL, requires={"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1},
                     drops=("attention_bias", "mlp_bias", "pretraining_tp")),
    "mistral": _MIXTRAL,
    "qwen2": Family(moe_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", gated_shared_expert=True, **_QWEN_MOE),
    # Qwen3 slides its window over the layers from max_window_layers on, Qwen3-MoE over every layer.
    "qwen3": Family(moe_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", requires={"use_sliding_window": False},
                    drops=("layer_types", "max_window_layers"), **_QWEN_MOE),
    "granite": Family(
        moe_type="granitemoe", architecture="GraniteMoeForCausalLM", experts_field="num_local_experts",
        hidden_field="intermediate_size", block="block_sparse_moe", router="router.layer.weight",
        stacked=("input_linear.weight", "output_linear.weight"), requires={"mlp_bias": False}, drops=("mlp_bias",),
    ),
    "olmo2": Family(
        moe_type="flex_olmo", architecture="FlexOlmoForCausalLM", experts_field="num_experts",
        hidden_field="intermediate_size", block="mlp", router="gate.weight",
        per_expert=("gate_proj.weight", "up_proj.weight", "down_proj.weight"), optional_renormalize=True,
    ),
}
# A native MoE model that moefx adopted (moefx.moefy on a loaded Mixtral...) is written as its own
# family (round trips in tests/artifact/test_hf_native_save.py and test_hf_native_adopted.py).
FAMILIES |= {f.moe_type: replace(f, requires={}, drops=()) for f in (FAMILIES["mistral"], FAMILIES["qwen2"],
                                                                     FAMILIES["qwen3"], FAMILIES["granite"],
                                                                     FAMILIES["olmo2"])}


def family_of(model_type: str | None) -> Family | None:
    """The MoE family a dense ``model_type`` is written as, or None when it has none."""
    return FAMILIES.get(model_type or "")
