"""rewrite: the user's module with each planned FFN replaced by a moefx MoE (see ``placement``).

    before                                   after (swap)            after (fold, BERT)
    layers.0.mlp: LlamaMLP                   layers.0.mlp: MoE       layer.intermediate: MoE
      gate_proj, up_proj, down_proj, act_fn                          layer.output.dense: Folded
                                                                     layer.output.LayerNorm (unchanged)

    after (inline): blocks.0 becomes an fx.GraphModule (same class name, same submodules and
    parameters but the FFN's) whose forward calls ``blocks.0.w1_moe``, a new MoE submodule.

Weights come from the dense FFN through an init strategy (``moefx.init``). Every reference to a
replaced module is updated, so a module shared by several parents (ALBERT) becomes one shared MoE.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from moefx.folded import Folded
from moefx.layer import MoE
from moefx.passes.canonicalize import canonicalize
from moefx.passes.capture import _Tracer
from moefx.passes.find_ffn import FFNMatch, find_regions
from moefx.passes.plan import Plan
from moefx.template import FFNTemplate


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


def rewrite(model: nn.Module, plan: Plan, *, num_experts: int, top_k: int, init: str, **options) -> Rewritten:
    """Every check runs before the first change, so a refusal leaves the model as it was."""
    for match in plan.convert:
        if init == "split" and match.rowwise_mid:
            raise ValueError(
                f"init='split' cannot split {match.path}: the ops between its projections ({match.activation}) mix "
                "hidden neurons, so the neurons cannot be shared out among experts; use init='upcycle'"
            )
    traced, skipped = _trace_inline_parents(model, plan)
    converted = []
    for match in plan.convert:
        if match.path in skipped:
            continue
        template = _template(model, match)
        layer_options = dict(options, feature_axis=1) if match.channels_first else options
        moe = MoE.from_ffn(template, num_experts=num_experts, top_k=top_k, init=init, **layer_options)
        del template
        placement = match.placement
        if placement.how == "inline":
            _rewrite_inline(model, match, moe, traced)
        else:
            _replace_module(model, placement.path, moe)
            for path in placement.folded:
                _replace_module(model, path, Folded(into=placement.path))
        converted.append(Converted(match, moe))
    return Rewritten(tuple(converted), tuple((m, skipped[m.path]) for m in plan.convert if m.path in skipped))


def _trace_inline_parents(model: nn.Module, plan: Plan) -> tuple[dict[str, fx.GraphModule], dict[str, str]]:
    """The re-traced, canonical module of every inline FFN (parent path → graph), and the FFNs
    that cannot be rewritten there (FFN path → reason): all known before the first change."""
    traced, problems, untraceable = {}, {}, {}
    for match in plan.convert:
        parent = match.placement.parent
        if match.placement.how != "inline":
            continue
        if parent not in traced and parent not in untraceable:
            try:
                traced[parent] = _trace_both_modes(model.get_submodule(parent), parent)
            except RewriteError as err:
                untraceable[parent] = str(err)
            else:
                canonicalize(traced[parent])
        if parent in untraceable:
            problems[match.path] = untraceable[parent]
        elif not _regions_of(traced[parent], match):
            problems[match.path] = (
                f"the FFN in {parent} ({type(model.get_submodule(parent)).__name__}) is found in the model's graph but "
                "not when torch.fx traces that module alone, so it cannot be rewritten there"
            )
    return traced, problems


def _regions_of(gm: fx.GraphModule, match: FFNMatch) -> list:
    """The regions of ``gm`` (the FFN's parent, traced alone) that are ``match``."""
    relative = match.up.removeprefix(match.placement.parent + ".")
    return [r for r in find_regions(gm) if r.up.weight == relative]


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
    pieces = [model.get_submodule(p.path) if p.path is not None else p.module for p in match.placement.pieces]
    if not pieces:
        return nn.Identity()
    return pieces[0] if len(pieces) == 1 else nn.Sequential(*pieces)


def _replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Point every attribute that holds the module at ``path`` to ``new``."""
    old = model.get_submodule(path)
    if old is model:
        raise RewriteError(f"cannot replace the root module in place (path {path!r})")
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, name, new)


def _rewrite_inline(model: nn.Module, match: FFNMatch, moe: MoE, traced: dict[str, fx.GraphModule]) -> None:
    placement = match.placement
    parent = model.get_submodule(placement.parent)
    gm = traced.pop(placement.parent, None)
    if gm is None:  # a second FFN in the same module finds it rewritten already (a GraphModule): trace that
        gm = fx.GraphModule(parent, _Tracer().trace(parent), type(parent).__name__)
        canonicalize(gm)
    regions = _regions_of(gm, match)
    if not regions:
        raise RewriteError(f"{placement.parent}: the FFN found in the model's graph is not found when tracing this module alone")
    attr = placement.path.rpartition(".")[2]
    gm.add_submodule(attr, moe)
    graph = gm.graph
    for region in regions:
        with graph.inserting_before(region.down.node):
            call = graph.call_module(attr, (region.entry,))
        region.down.node.replace_all_uses_with(call)
        for node in reversed(region.nodes):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    new = fx.GraphModule(gm, graph, type(parent).__name__)
    _replace_module(model, placement.parent, new)


def _trace_both_modes(module: nn.Module, path: str) -> fx.GraphModule:
    """The module's forward traced by torch.fx; refused when train and eval trace differently."""
    was_training = module.training
    traced = {}
    try:
        for mode in (True, False):
            module.train(mode)
            try:
                traced[mode] = fx.GraphModule(module, _Tracer().trace(module), type(module).__name__)
            except Exception as err:  # noqa: BLE001
                raise RewriteError(
                    f"the FFN in {path} ({type(module).__name__}) is written inside its forward, which torch.fx cannot "
                    f"trace on its own ({type(err).__name__}: {err}); put the FFN in an nn.Module of its own"
                ) from err
    finally:
        module.train(was_training)
    if traced[True].code != traced[False].code:
        raise RewriteError(
            f"the forward of {path} ({type(module).__name__}) differs between train and eval mode (it reads "
            "self.training, e.g. F.dropout(x, p, self.training)); torch.fx would freeze one mode. Use nn.Dropout "
            "modules, or put the FFN in an nn.Module of its own"
        )
    return traced[was_training]
