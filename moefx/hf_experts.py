"""moefx's grouped kernels as a transformers experts implementation: an unconverted Hugging Face
MoE (any experts class decorated with ``@use_experts_implementation``) runs its experts on
``moefx::plan_dispatch``, ``moefx::gather_grouped_linear`` and ``moefx::grouped_linear_combine``
with one setting:

    moefx.hf_experts.register()
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moefx")
    # or, on a model already built: model.set_experts_implementation("moefx")

Legend: T tokens, D model dim, H expert hidden dim, E experts, K top-k, S = T*K slots.

The function reads what the decorator declares on the experts module (``has_gate``, ``has_bias``,
``is_transposed``; ``is_concatenated`` is the family's ``_apply_gate``'s business, which runs
unchanged between the two grouped linears). Transposed weights (GPT-OSS's ``[E, in, out]``) are
copied to moefx's ``[E, out, in]`` on every call: correct, but slower than adopting the block
(``moefx.moefy``), which stores them once in moefx's layout. Expert-parallel sentinels (expert
index E) are skipped, as moefx routers' "nowhere" choices are. Registration goes through
transformers' own ``ExpertsInterface.register``: nothing of transformers is patched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)

NAME = "moefx"


def register() -> None:
    """Make ``experts_implementation="moefx"`` available to every transformers model (needs transformers >= 5)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as err:
        raise ImportError(
            "moefx.hf_experts.register() needs transformers >= 5 (its experts interface, "
            "transformers.integrations.moe): pip install 'transformers>=5'"
        ) from err
    ExpertsInterface.register(NAME, moefx_experts_forward)


def _out_in(weight_EXY: Tensor, transposed: bool) -> Tensor:
    return weight_EXY.transpose(1, 2).contiguous() if transposed else weight_EXY


def moefx_experts_forward(experts: nn.Module, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """A transformers experts forward (``hidden_states, top_k_index, top_k_weights`` → ``[T, D]``)
    on moefx's ops."""
    if getattr(experts, "has_post_expert_norm", False):
        raise NotImplementedError("experts_implementation='moefx' does not run a post-expert norm: use 'grouped_mm'")
    E, transposed = experts.num_experts, getattr(experts, "is_transposed", False)
    gated, has_bias = getattr(experts, "has_gate", True), getattr(experts, "has_bias", False)
    first = "gate_up_proj" if gated else "up_proj"
    in_proj_EHD = _out_in(getattr(experts, first), transposed)
    out_proj_EDH = _out_in(experts.down_proj, transposed)
    in_bias = getattr(experts, f"{first}_bias") if has_bias else None
    out_bias = experts.down_proj_bias if has_bias else None
    row_slot_S, slot_row_S, offsets_E1 = torch.ops.moefx.plan_dispatch(experts_TK.long(), E, None)
    h_SH = torch.ops.moefx.gather_grouped_linear(x_TD, in_proj_EHD, in_bias, offsets_E1, row_slot_S, slot_row_S)
    h_SH = experts._apply_gate(h_SH) if gated else experts.act_fn(h_SH)
    out_TD = torch.ops.moefx.grouped_linear_combine(
        h_SH, out_proj_EDH, out_bias, offsets_E1, row_slot_S, weights_TK.float()
    )
    return out_TD.to(x_TD.dtype)
