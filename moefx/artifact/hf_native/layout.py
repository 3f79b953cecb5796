"""What a converted transformers model becomes in its native MoE family: the family, its config,
and which decoder layers hold experts; or a ``NativeFormatError`` naming what the family cannot
express.

The MoE layers must sit where the dense model's MLPs were (``model.layers.{i}.mlp``, or the
family's own block for an adopted native model) and route as
the family does: softmax top-k, dropless, no expert biases, no routed scale, the dense model's
activation, one expert count, top-k and expert size for the whole model. Shared experts only where
the family has a sigmoid-gated shared expert (Qwen2-MoE), gated so, of one width in every layer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from moefx.artifact.hf_native.families import FAMILIES, Family, family_of
from moefx.layer.activations import identify
from moefx.model import is_expert_parallel, is_offloaded, moe_layers

logger = logging.getLogger(__name__)

WAY_OUT = "write the moefx format instead (moefx convert --format moefx, or moefx.save)"
_MOE_PATH = re.compile(r"^model\.layers\.(\d+)\.(\w+)$")  # the dense MLP's place, or the family's block's
_NOT_CARRIED = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")


class NativeFormatError(ValueError):
    """A converted model that its native transformers MoE family cannot express."""


@dataclass(frozen=True)
class NativeLayout:
    family: Family
    config: object  # the MoE family's transformers config
    moe_layers: dict[str, int]  # MoE layer path -> decoder layer index
    tied: frozenset[str]  # state_dict names that are tied copies (not written, as save_pretrained does)
    shared_width: int = 0  # the layers' shared-expert hidden size; 0: none (a zero one where the family needs it)


def native_layout(model: nn.Module) -> NativeLayout:
    """The native layout of ``model`` (a converted transformers model; its tensors may be on meta)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = family_of(model_type)
    name = type(model).__name__
    if family is None:
        known = ", ".join(f"{dense} -> {f.moe_type}" for dense, f in FAMILIES.items() if dense != f.moe_type)
        raise NativeFormatError(f"{name} (model_type {model_type!r}) has no native MoE family moefx writes ({known}): {WAY_OUT}")
    if is_expert_parallel(model) or is_offloaded(model):
        raise NativeFormatError(f"{name}'s experts are sharded or offloaded, so this process does not hold them all: "
                                "write it before moefx.parallelize / moefx.offload, or use moefx.save")
    layers = list(moe_layers(model))
    if not layers:
        raise NativeFormatError(f"{name} has no MoE layer: convert it first (moefx.moefy / moefx convert)")
    indices = {}
    for path, layer in layers:
        match = _MOE_PATH.match(path)
        if match is None or match.group(2) not in ("mlp", family.block):
            raise NativeFormatError(f"the MoE layer at {path} is not a decoder layer's MLP (model.layers.N.mlp), where "
                                    f"{family.moe_type} keeps its experts: {WAY_OUT}")
        _check_layer(path, layer, family, config)
        indices[path] = int(match.group(1))
    first = layers[0][1].config
    _check_alike(layers)
    dense = sorted(set(range(config.num_hidden_layers)) - set(indices.values()))
    if dense and not family.dense_layers:
        raise NativeFormatError(
            f"{family.moe_type} has experts in every decoder layer, but layers {dense} were left dense: convert every "
            f"layer's MLP (no --include/--exclude/--every), or {WAY_OUT}"
        )
    if first.z_loss_coef:
        logger.info("%s has no router z-loss: z_loss_coef=%s is not written (it only matters in training)",
                       family.moe_type, first.z_loss_coef)
    dtype = layers[0][1].experts.dtype
    native = _native_config(config, family, first, dense, dtype)
    tied = frozenset((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    return NativeLayout(family, native, indices, tied, shared_width(first))


def shared_width(config) -> int:
    """A layer's shared-expert hidden size (moefx holds its shared experts as one FFN), 0 without."""
    return config.num_shared_experts * config.d_hidden


def renormalizes(config) -> bool:
    """Whether a layer's top-k weights sum to 1: renormalised, or a softmax over the k chosen logits."""
    return bool(config.renormalize or not config.softmax_first)


def _check_layer(path: str, layer, family: Family, model_config) -> None:
    c = layer.config
    problems = []
    if c.gate != "topk":
        problems.append(f"gate={c.gate!r} (the family routes by softmax top-k)")
    if c.capacity_factor is not None:
        problems.append(f"capacity_factor={c.capacity_factor} (the family is dropless)")
    if c.bias:
        problems.append("expert biases (bias=True)")
    if not c.gated:
        problems.append("ungated experts (gated=False; the family's experts are GLUs)")
    if c.routed_scale != 1.0:
        problems.append(f"routed_scale={c.routed_scale} (init='split' scales the experts' sum)")
    if c.num_shared_experts and not family.gated_shared_expert:
        problems.append(f"num_shared_experts={c.num_shared_experts} (the family has no shared expert)")
    elif c.num_shared_experts and not c.shared_expert_gate:
        problems.append("shared experts without shared_expert_gate (the family weighs its shared expert by a sigmoid gate)")
    if c.jitter:
        problems.append(f"router_jitter={c.jitter}")
    if not renormalizes(c) and not family.optional_renormalize:
        problems.append("top-k weights that are not renormalised (renormalize=False)")
    if c.d_model != model_config.hidden_size:
        problems.append(f"d_model={c.d_model}, not the model's hidden_size={model_config.hidden_size}")
    ours, theirs = identify(layer.experts.mid.act), _activation(model_config)
    if ours is None or ours != theirs:
        problems.append(f"activation {ours or c.activation!r}, not the model's hidden_act {model_config.hidden_act!r}")
    if problems:
        raise NativeFormatError(f"{family.moe_type} cannot express the MoE layer at {path}: {'; '.join(problems)}: {WAY_OUT}")


def _activation(model_config) -> str | None:
    from transformers.activations import ACT2FN

    return identify(ACT2FN[model_config.hidden_act])


def _check_alike(layers) -> None:
    """The family has one expert count, top-k, expert size, renormalisation and aux-loss weight."""
    def key(c):
        return {"num_experts": c.num_experts, "top_k": c.top_k, "d_hidden": c.d_hidden,
                "renormalize": renormalizes(c), "load_balance_coef": c.load_balance_coef,
                "shared expert width": shared_width(c)}

    (first_path, first), *rest = layers
    for path, layer in rest:
        differ = [f"{k}: {v!r} at {first_path}, {key(layer.config)[k]!r} at {path}"
                  for k, v in key(first.config).items() if key(layer.config)[k] != v]
        if differ:
            raise NativeFormatError(f"the MoE layers differ ({'; '.join(differ)}), and the family's config holds one "
                                    f"value for all layers: convert every layer with the same options, or {WAY_OUT}")


def _native_config(config, family: Family, c, dense: list[int], dtype: torch.dtype):
    """The MoE family's config: every dense field it shares, and the MoE fields from the layers."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fields = config.to_dict()
    for field, value in family.requires.items():
        if fields.get(field, value) != value:
            raise NativeFormatError(f"{family.moe_type} has no {field}: the dense model's {field}={fields[field]!r} "
                                    f"cannot be expressed (it needs {value!r}): {WAY_OUT}")
    for field in (*family.drops, *_NOT_CARRIED):
        fields.pop(field, None)
    moe = {
        family.experts_field: c.num_experts, "num_experts_per_tok": c.top_k, family.hidden_field: c.d_hidden,
        # transformers' load-balancing loss is top_k times moefx's (it sums the top-k fractions, moefx
        # averages them), so this coefficient gives the same loss (and adoption reads it back as is).
        "router_aux_loss_coef": c.load_balance_coef / c.top_k, "output_router_logits": False,
    }
    if family.optional_renormalize:
        moe["norm_topk_prob"] = renormalizes(c)
    if family.dense_layers:
        moe |= {"mlp_only_layers": dense, "decoder_sparse_step": 1}
    if family.gated_shared_expert:  # the layers' own, or width 1 with zero weights: it adds exactly 0 (plan.py)
        moe["shared_expert_intermediate_size"] = shared_width(c) or 1
    native = CONFIG_MAPPING[family.moe_type](**{**fields, **moe})
    native.architectures = [family.architecture]
    native.dtype = dtype
    return native
