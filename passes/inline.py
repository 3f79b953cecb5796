"""inline: an FFN written inside a bigger forward is rewritten in that module's own forward.

    before: blocks.0 (Block)                     after: blocks.0 (still a Block, same attributes)
      forward: x + down(gelu(up(x)))               forward (torch.fx code): x + up_moe(x)
      up, down: Linear                             up_moe: MoE      (up and down are its experts now)

The module is traced by torch.fx alone, with the arguments it got when the model ran on the
example inputs (``None`` and other constants fixed, under fx's guards). fx cannot see an
``isinstance`` test or a branch on a tensor's value and would freeze one side silently, so the
trace must reproduce the module's own forward on those arguments; all of it is checked before
any change. The rewritten graph becomes the forward of a subclass of the module's class, made for
that one object: its other parameters, buffers, attributes and methods stay, and so does
``isinstance``.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map_only

from moefx.layer import MoE
from moefx.passes.canonicalize import canonicalize
from moefx.passes.capture import _on_meta, _Tracer
from moefx.passes.find_ffn import FFNMatch, find_regions
from moefx.passes.ops import remove_dead_code
from moefx.passes.plan import Plan

log = logging.getLogger(__name__)

_INLINE_CLASS = "_moefx_inline_base"  # set on the subclasses made here: the user's class they extend


class InlineError(RuntimeError):
    """An inline FFN whose module cannot be rewritten (the FFN is left dense, with this reason)."""


def trace_parents(
    model: nn.Module, plan: Plan, example_inputs=None, example_kwargs=None
) -> tuple[dict[str, fx.GraphModule], dict[str, str]]:
    """The checked, canonical trace of every inline FFN's module (path → graph), and the FFNs that
    cannot be rewritten there (FFN path → reason)."""
    parents = list(dict.fromkeys(m.placement.parent for m in plan.convert if m.placement.how == "inline"))
    if not parents:
        return {}, {}
    calls = _record_calls(model, parents, example_inputs, example_kwargs)
    traced, untraceable = {}, {}
    for path in parents:
        module = model.get_submodule(path)
        try:
            gm = _trace_both_modes(module, path, _constants(module, calls.get(path)))
            canonicalize(gm)
            _check_the_trace(gm, module, path, calls.get(path))
        except InlineError as err:
            untraceable[path] = str(err)
        else:
            traced[path] = gm
    problems = {}
    for match in plan.convert:
        parent = match.placement.parent
        if match.placement.how != "inline":
            continue
        if parent in untraceable:
            problems[match.path] = untraceable[parent]
        elif not regions_of(traced[parent], match):
            problems[match.path] = (
                f"the FFN in {parent} ({type(model.get_submodule(parent)).__name__}) is found in the model's graph but "
                "not when torch.fx traces that module alone, so it cannot be rewritten there"
            )
    return traced, problems


def regions_of(gm: fx.GraphModule, match: FFNMatch) -> list:
    """The regions of ``gm`` (the FFN's module, traced alone) that are ``match``."""
    relative = match.up.removeprefix(match.placement.parent + ".")
    return [r for r in find_regions(gm) if r.up.weight == relative]


def rewrite_inline(model: nn.Module, match: FFNMatch, moe: MoE, traced: dict[str, fx.GraphModule]) -> None:
    """Call ``moe`` where the FFN's ops were, in the module's forward; the FFN's own weights go."""
    placement = match.placement
    module = model.get_submodule(placement.parent)
    gm = traced[placement.parent]  # after a first FFN of this module, its graph with that one rewritten
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
    traced[placement.parent] = _set_forward(module, graph)


def _attributes_used(graph: fx.Graph) -> set[str]:
    """The module's own attributes the graph reads (the first part of each target)."""
    return {n.target.split(".")[0] for n in graph.nodes if n.op in ("get_attr", "call_module")}


def _set_forward(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """Make ``graph`` the forward of ``module`` alone: its class becomes a subclass, for this object,
    of the user's class, whose forward is the graph's code (which reads the module's attributes).
    Returns that code as a GraphModule, for a next FFN of the same module."""
    base = getattr(type(module), _INLINE_CLASS, type(module))
    code = fx.GraphModule(module, graph, base.__name__)

    def __reduce_ex__(self, protocol):  # pickle by the user's class and the graph (this class is made here)
        return _rebuild, (base, _detached(graph), dict(self.__dict__))

    namespace = {"forward": type(code).forward, "__reduce_ex__": __reduce_ex__, _INLINE_CLASS: base,
                 "__module__": base.__module__}
    module.__class__ = type(base.__name__, (base,), namespace)
    return code


def _detached(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` that no GraphModule owns (pickling the graph would pickle its owner)."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def _rebuild(base: type, graph: fx.Graph, state: dict) -> nn.Module:
    """A pickled (or copied) inline-rewritten module, back."""
    module = base.__new__(base)
    module.__setstate__(state)
    _set_forward(module, graph)
    return module


def _record_calls(model: nn.Module, paths: list[str], args, kwargs) -> dict[str, tuple[tuple, dict]]:
    """The arguments each module got on its first call when the model ran on the example inputs
    (in eval mode, without gradients; every mode is put back)."""
    if args is None and kwargs is None:
        return {}
    if _on_meta(model):
        args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
    calls = {}

    def recorder(path: str):
        def record(module, call_args, call_kwargs):
            calls.setdefault(path, (call_args, call_kwargs))
        return record

    handles = [model.get_submodule(p).register_forward_pre_hook(recorder(p), with_kwargs=True) for p in paths]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*(args or ()), **(kwargs or {}))
    except Exception as err:  # noqa: BLE001  (capture ran it; a failure here leaves the traces unchecked)
        log.warning("running %s to check the inline FFNs' traces failed (%s): they are not checked",
                    type(model).__name__, err)
        calls.clear()
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.train(mode)
    return calls


def _constants(module: nn.Module, call: tuple[tuple, dict] | None) -> dict | None:
    """fx's ``concrete_args``: the forward's arguments that were None, a bool, a number or a string
    (defaults included). fx would otherwise see a placeholder, for which ``x is None`` is False."""
    if call is None:
        return None
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind(*call[0], **call[1])
    except TypeError:
        return None
    bound.apply_defaults()
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: value for name, value in bound.arguments.items()
        if signature.parameters[name].kind in plain and (value is None or isinstance(value, (bool, int, float, str)))
    }


def _trace_both_modes(module: nn.Module, path: str, constants: dict | None) -> fx.GraphModule:
    """The module's forward traced by torch.fx; refused when train and eval trace differently."""
    was_training = module.training
    traced = {}
    try:
        for mode in (True, False):
            module.train(mode)
            try:
                traced[mode] = fx.GraphModule(module, _trace(module, constants), type(module).__name__)
            except Exception as err:  # noqa: BLE001
                raise InlineError(
                    f"the FFN in {path} ({type(module).__name__}) is written inside its forward, which torch.fx cannot "
                    f"trace on its own ({type(err).__name__}: {err}); put the FFN in an nn.Module of its own"
                ) from err
    finally:
        module.train(was_training)
    if traced[True].code != traced[False].code:
        raise InlineError(
            f"the forward of {path} ({type(module).__name__}) differs between train and eval mode (it reads "
            "self.training, e.g. F.dropout(x, p, self.training)); torch.fx would freeze one mode. Use nn.Dropout "
            "modules, or put the FFN in an nn.Module of its own"
        )
    return traced[was_training]


def _trace(module: nn.Module, constants: dict | None) -> fx.Graph:
    graph = _Tracer().trace(module, concrete_args=constants or None)
    for node in graph.nodes:  # fx names a fixed argument `mask_1`; callers pass it as `mask=`
        if node.op == "placeholder" and node.target.rpartition("_")[0] in (constants or {}):
            node.target = node.target.rpartition("_")[0]
    return graph


def _check_the_trace(gm: fx.GraphModule, module: nn.Module, path: str, call: tuple[tuple, dict] | None) -> None:
    """The trace must give the module's own outputs on the arguments it got (values; only shapes
    on the meta device)."""
    if call is None:
        log.warning(
            "the trace of %s (%s) is not checked against its forward: it was not called on example inputs", path,
            type(module).__name__,
        )
        return
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            want, got = tree_flatten(module(*call[0], **call[1]))[0], tree_flatten(gm(*call[0], **call[1]))[0]
    except Exception as err:  # noqa: BLE001  (the trace itself fails on them: it is not the forward)
        want, got = None, err
    finally:
        for m, mode in modes.items():
            m.train(mode)
    if not _same_outputs(want, got):
        raise InlineError(
            f"torch.fx's trace of {path} ({type(module).__name__}) alone does not reproduce its forward on the example "
            "inputs (the forward may test isinstance() or a tensor's value, which torch.fx cannot see); put the FFN in "
            "an nn.Module of its own"
        )


def _same_outputs(want, got) -> bool:
    if not isinstance(want, list) or not isinstance(got, list) or len(want) != len(got):
        return False
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_meta or a.numel() == 0:
            continue
        scale = 1 + a.abs().max().item()
        if not torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5 * scale):
            return False
    return True
