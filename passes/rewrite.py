"""rewrite: the user's module with each planned FFN replaced by a moefx MoE (see ``placement``).

    before                                   after (swap)            after (fold, BERT)
    layers.0.mlp: LlamaMLP                   layers.0.mlp: MoE       layer.intermediate: MoE
      gate_proj, up_proj, down_proj, act_fn                          layer.output.dense: Folded
                                                                     layer.output.LayerNorm (unchanged)

    after (inline, see ``inline``): blocks.0 keeps its class, attributes and other submodules; its
    forward (torch.fx code now) calls ``blocks.0.w1_moe``, a new MoE submodule.

Weights come from the dense FFN through an init strategy (``moefx.init.strategies``). Every reference to a
replaced module is updated, so a module shared by several parents (ALBERT) becomes one shared MoE.
The MoE's activation is built here from the match's description (``placement.Piece``): the model's
own modules, an ``nn.Dropout`` for a functional dropout, the catalogue's module for a named
activation (``moefx.layer.activations``), or else the FFN's own ops, copied out of the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moefx.init.seeding import seeded
from moefx.init.template import FFNTemplate
from moefx.layer.activations import ACTIVATIONS, make_activation
from moefx.layer.folded import Folded
from moefx.layer.moe import MoE
from moefx.passes.find_ffn import FFNMatch
from moefx.passes.inline import rewrite_inline, trace_parents
from moefx.passes.placement import Piece
from moefx.passes.plan import Plan


class RewriteError(RuntimeError):
    """An FFN was matched but cannot be replaced in the module tree."""


@dataclass(frozen=True)
class Converted:
    match: FFNMatch
    layer: MoE


@dataclass(frozen=True)
class Rewritten:
    converted: tuple[Converted, ...]
    skipped: tuple[tuple[FFNMatch, str], ...] = ()  # inline FFNs whose module cannot be re-traced, and why


def rewrite(
    model: nn.Module, plan: Plan, *, num_experts: int, top_k: int, init: str, example_inputs=None, example_kwargs=None,
    **options,
) -> Rewritten:
    """Every check runs before the first change, so a refusal leaves the model as it was."""
    for match in plan.convert:
        if init == "split" and match.rowwise_mid:
            raise ValueError(
                f"init='split' cannot split {match.path}: the ops between its projections ({match.activation}) mix "
                "hidden neurons, so the neurons cannot be shared out among experts; use init='upcycle'"
            )
    traced, skipped = trace_parents(model, plan, example_inputs, example_kwargs)
    converted = []
    for match in plan.convert:
        if match.path in skipped:
            continue
        moe = layer_for(model, match, num_experts=num_experts, top_k=top_k, init=init, **options)
        placement = match.placement
        # The new modules take the train/eval mode of what they replace (a model converted in
        # eval mode must not route, or drop out, as in training).
        replaced = model.get_submodule(placement.parent if placement.how == "inline" else placement.path)
        moe.train(replaced.training)
        if placement.how == "inline":
            rewrite_inline(model, match, moe, traced)
        else:
            _replace_module(model, placement.path, moe)
            for path in placement.folded:
                _replace_module(model, path, Folded(into=placement.path).train(replaced.training))
        converted.append(Converted(match, moe))
    return Rewritten(tuple(converted), tuple((m, skipped[m.path]) for m in plan.convert if m.path in skipped))


def layer_for(model: nn.Module, match: FFNMatch, *, num_experts: int, top_k: int, init: str, seed: int = 0,
              **options) -> MoE:
    """The MoE that replaces ``match``, built from the FFN's weights in ``model``. Its random parts come
    from the layer's own generator (``moefx.init.seeding``): streaming a checkpoint, which builds one
    layer at a time (``moefx.artifact.streaming``), builds the same layer."""
    template = _template(model, match)
    layer_options = dict(options, feature_axis=1) if match.channels_first else options
    with seeded(seed, match.path, template.up_weight.device):
        return MoE.from_ffn(template, num_experts=num_experts, top_k=top_k, init=init, **layer_options)


def _template(model: nn.Module, match: FFNMatch) -> FFNTemplate:
    def weight(name: str, transposed: bool = False):
        w = model.get_parameter(name).detach()
        if match.channels_first:
            return w.flatten(1)  # a 1x1 convolution's [out, in, 1, ...]
        return w.t() if transposed else w

    def bias(name: str | None):
        return None if name is None else model.get_parameter(name).detach()

    activation = _activation(model, match)
    down, down_bias = weight(match.down, match.down_transposed), bias(match.down_bias)
    if match.fused:
        return FFNTemplate.from_fused_gate_up(
            weight(match.up, match.up_transposed), down, activation, gate_first=match.gate_first,
            gate_up_bias=bias(match.up_bias), down_bias=down_bias,
        )
    return FFNTemplate(
        up_weight=weight(match.up, match.up_transposed), up_bias=bias(match.up_bias),
        gate_weight=None if match.gate is None else weight(match.gate), gate_bias=bias(match.gate_bias),
        down_weight=down, down_bias=down_bias, activation=activation,
    )


def _activation(model: nn.Module, match: FFNMatch) -> nn.Module:
    pieces = [_piece_module(model, p) for p in match.placement.pieces]
    if not pieces:
        return nn.Identity()
    return pieces[0] if len(pieces) == 1 else nn.Sequential(*pieces)


def _piece_module(model: nn.Module, piece: Piece) -> nn.Module:
    """The module for one piece of the activation: the model's own, or one built from its description."""
    if piece.path is not None:
        return model.get_submodule(piece.path)
    if piece.dropout is not None:
        return nn.Dropout(piece.dropout)
    return make_activation(piece.name) if piece.name in ACTIVATIONS else piece.ops.module(model)


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Point every attribute that holds the module at ``path`` to ``new``."""
    old = model.get_submodule(path)
    if old is model:
        raise RewriteError(f"cannot replace the root module in place (path {path!r})")
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)
