"""surgery: an FFN's nodes in a module's traced forward replaced by one call of its MoE.

    before (blocks.0 traced)                     after
      %h = linear(%x, w1.weight)                   %m = call_module[w1_moe](%x)
      %a = gelu(%h)                         ─▶     %r = add(%x, %m)
      %y = linear(%a, w2.weight)                   (w1, w2 deleted from blocks.0; w1_moe added)
      %r = add(%x, %y)
"""

from __future__ import annotations

from torch import fx, nn

from moefx.layer.moe import MoE
from moefx.passes.find_ffn import FFNMatch, find_regions
from moefx.passes.graph.ops import remove_dead_code
from moefx.passes.inline.errors import InlineError
from moefx.passes.inline.subclass import set_forward
from moefx.passes.inline.trace import Traced
from moefx.passes.region import Region


def regions_of(gm: fx.GraphModule, match: FFNMatch) -> list[Region]:
    """The regions of ``gm`` (the FFN's module, traced alone) that are ``match``."""
    relative = match.up.removeprefix(match.placement.parent + ".")
    return [r for r in find_regions(gm) if r.up.weight == relative]


def rewrite_inline(model: nn.Module, match: FFNMatch, moe: MoE, traced: dict[str, Traced]) -> None:
    """Call ``moe`` where the FFN's ops were, in the module's forward; the FFN's own weights go."""
    placement = match.placement
    module = model.get_submodule(placement.parent)
    gm = traced[placement.parent].gm  # after a first FFN of this module, its graph with that one rewritten
    regions = regions_of(gm, match)
    if not regions:  # trace_parents found them: a bug if this happens
        raise InlineError(f"{placement.parent}: the FFN {match.path} is no longer in the module's graph")
    attr = placement.path.rpartition(".")[2]
    graph = gm.graph
    used_before = _attributes_used(graph)
    gm.add_submodule(attr, moe)  # the graph checks the module it calls exists
    for region in regions:
        with graph.inserting_before(region.down.node):
            call = graph.call_module(attr, (region.entry,))
        region.down.node.replace_all_uses_with(call)
        for node in reversed(region.nodes):
            graph.erase_node(node)
    remove_dead_code(graph)
    graph.lint()
    module.add_module(attr, moe)
    for name in used_before - _attributes_used(graph):  # the FFN's projections and activation
        delattr(module, name)
    frozen = traced[placement.parent].frozen
    traced[placement.parent] = Traced(set_forward(module, graph, frozen), frozen)


def _attributes_used(graph: fx.Graph) -> set[str]:
    """The module's own attributes the graph reads (the first part of each target)."""
    return {n.target.split(".")[0] for n in graph.nodes if n.op in ("get_attr", "call_module")}
