"""parents: the modules whose forward holds an inline FFN, each traced once, and the FFNs that
cannot be rewritten there.

    plan.convert (inline: blocks.0.w1_moe, blocks.1.w1_moe)
      ─▶ traced: {"blocks.0": Traced, "blocks.1": Traced}
         problems: {"blocks.1.w1_moe": "Block uses self.w1 outside its forward, ..."}

An FFN's module is refused when torch.fx cannot trace it alone (``trace``), when the FFN is not
found in that trace, or when a method other than forward uses the FFN's projections (they become
the experts, so that method would break): the FFN stays dense.
"""

from __future__ import annotations

import inspect

from torch import nn

from moefx.passes.find_ffn import FFNMatch
from moefx.passes.inline.errors import InlineError
from moefx.passes.inline.record_calls import record_calls
from moefx.passes.inline.surgery import regions_of
from moefx.passes.inline.trace import Traced, checked_trace
from moefx.passes.plan import Plan


def trace_parents(
    model: nn.Module, plan: Plan, example_inputs=None, example_kwargs=None
) -> tuple[dict[str, Traced], dict[str, str]]:
    """The checked, canonical trace of every inline FFN's module (path → trace), and the FFNs that
    cannot be rewritten there (FFN path → reason)."""
    parents = list(dict.fromkeys(m.placement.parent for m in plan.convert if m.placement.how == "inline"))
    if not parents:
        return {}, {}
    calls = record_calls(model, parents, example_inputs, example_kwargs)
    traced, untraceable = {}, {}
    for path in parents:
        try:
            traced[path] = checked_trace(model.get_submodule(path), path or "the model", calls.get(path, []))
        except InlineError as err:
            untraceable[path] = str(err)
    problems = {}
    for match in plan.convert:
        parent = match.placement.parent
        if match.placement.how != "inline":
            continue
        module = model.get_submodule(parent)
        shared = sorted(_ffn_attributes(match) & _used_outside_forward(type(module)))
        if parent in untraceable:
            problems[match.path] = untraceable[parent]
        elif not regions_of(traced[parent].gm, match):
            problems[match.path] = (
                f"the FFN in {parent or 'the model'} ({type(module).__name__}) is found in the model's graph but "
                "not when torch.fx traces that module alone, so it cannot be rewritten there"
            )
        elif shared:
            problems[match.path] = (
                f"{type(module).__name__} uses {', '.join('self.' + n for n in shared)} outside its forward, and "
                "those become the experts; put the FFN in an nn.Module of its own"
            )
    return traced, problems


def _ffn_attributes(match: FFNMatch) -> set[str]:
    """The attributes of the FFN's module that hold its weights (they become the experts)."""
    names = (match.up, match.gate, match.down, match.up_bias, match.gate_bias, match.down_bias)
    prefix = match.placement.parent + "."
    return {name.removeprefix(prefix).split(".")[0] for name in names if name}


def _used_outside_forward(cls: type) -> set[str]:
    """Names the methods of the user's classes read (``self.up`` in ``probe``), but forward,
    ``__init__`` and the other special methods, and the weight initialisers, which set them up."""
    names = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name, value in vars(klass).items():
            setup = name.startswith("__") or "init" in name or name == "reset_parameters"
            if name != "forward" and not setup and inspect.isfunction(value):
                names |= _code_names(value.__code__)
    return names


def _code_names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _code_names(const)
    return names
