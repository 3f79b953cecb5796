"""inline: an FFN written inside a bigger forward is rewritten in that module's own forward.

    before: blocks.0 (Block)                     after: blocks.0 (still a Block, same attributes)
      forward: x + down(gelu(up(x)))               forward (torch.fx code): x + up_moe(x)
      up, down: Linear                             up_moe: MoE      (up and down are its experts now)

The module is traced by torch.fx alone, with the arguments that were None on the example inputs
fixed (fx's guard then refuses another value; other constants are fixed only if fx needs them,
``if flag:``), and every call the module got when the model ran on the example inputs must agree
on them. fx cannot see an ``isinstance``/``type`` test on an argument and silently keeps one side,
so the trace must give the forward's outputs on each of those calls (on a random CPU copy for a
module on the meta device); all of it is checked before any change. The rewritten graph becomes
the forward of a subclass of the module's class, made for that one object: its other weights,
attributes, methods and ``isinstance`` stay. The plain attributes the forward read (``self.scale``)
are values in the graph now, so they become read-only; a method other than forward that uses the
FFN's projections keeps the FFN dense.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map_only

from moefx.layer.moe import MoE
from moefx.passes.canonicalize import canonicalize
from moefx.passes.capture import _on_meta, _Tracer, inputs_to_run
from moefx.passes.find_ffn import FFNMatch, find_regions
from moefx.passes.graph.ops import remove_dead_code
from moefx.passes.plan import Plan

log = logging.getLogger(__name__)

_INLINE_CLASS = "_moefx_inline_base"  # set on the subclasses made here: the user's class they extend


class InlineError(RuntimeError):
    """An inline FFN whose module cannot be rewritten (the FFN is left dense, with this reason)."""


def trace_parents(
    model: nn.Module, plan: Plan, example_inputs=None, example_kwargs=None
) -> tuple[dict[str, Traced], dict[str, str]]:
    """The checked, canonical trace of every inline FFN's module (path → trace), and the FFNs that
    cannot be rewritten there (FFN path → reason)."""
    parents = list(dict.fromkeys(m.placement.parent for m in plan.convert if m.placement.how == "inline"))
    if not parents:
        return {}, {}
    calls = _record_calls(model, parents, example_inputs, example_kwargs)
    traced, untraceable = {}, {}
    for path in parents:
        try:
            traced[path] = _checked_trace(model.get_submodule(path), path, calls.get(path, []))
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
                f"the FFN in {parent} ({type(module).__name__}) is found in the model's graph but "
                "not when torch.fx traces that module alone, so it cannot be rewritten there"
            )
        elif shared:
            problems[match.path] = (
                f"{type(module).__name__} uses {', '.join('self.' + n for n in shared)} outside its forward, and "
                "those become the experts; put the FFN in an nn.Module of its own"
            )
    return traced, problems


@dataclass
class Traced:
    gm: fx.GraphModule  # the module's forward as a graph (rewritten FFN by FFN)
    frozen: frozenset[str]  # plain attributes the forward reads: fx wrote their values into the graph


def _checked_trace(module: nn.Module, path: str, calls: list[tuple[tuple, dict]]) -> Traced:
    """Traced with the arguments that were None fixed (fx would take ``None`` for a tensor), else
    with every constant argument fixed when it needs them (``if flag:``), then checked."""
    constants = _constants(module, path, calls, lambda value: value is None)
    try:
        traced = _trace_both_modes(module, path, constants)
    except InlineError:
        every = _constants(module, path, calls, lambda value: isinstance(value, (type(None), bool, int, float, str)))
        if every == constants:
            raise
        constants = every
        traced = _trace_both_modes(module, path, constants)
    canonicalize(traced.gm)
    _check_the_trace(traced.gm, module, path, calls)
    if constants:
        log.warning("%s (%s): the rewritten forward fixes %s, as on the example inputs; a call with another value "
                    "raises", path, type(module).__name__, ", ".join(f"{k}={v!r}" for k, v in constants.items()))
    return traced


def regions_of(gm: fx.GraphModule, match: FFNMatch) -> list:
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
    traced[placement.parent] = Traced(_set_forward(module, graph, frozen), frozen)


def _attributes_used(graph: fx.Graph) -> set[str]:
    """The module's own attributes the graph reads (the first part of each target)."""
    return {n.target.split(".")[0] for n in graph.nodes if n.op in ("get_attr", "call_module")}


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


def _set_forward(module: nn.Module, graph: fx.Graph, frozen: frozenset[str]) -> fx.GraphModule:
    """Make ``graph`` the forward of ``module`` alone: its class becomes a subclass, for this object,
    of the user's class, whose forward is the graph's code (which reads the module's attributes).
    The plain attributes the graph holds the values of become read-only. Returns the code as a
    GraphModule, for a next FFN of the same module."""
    base = getattr(type(module), _INLINE_CLASS, type(module))
    code = fx.GraphModule(module, graph, base.__name__)

    def __reduce_ex__(self, protocol):  # pickled as the user's class, the graph and the state
        return _new_inline, (base, _detached(graph), frozen), dict(self.__dict__)

    namespace = {"forward": type(code).forward, "__reduce_ex__": __reduce_ex__, _INLINE_CLASS: base,
                 "__module__": base.__module__, **{name: _read_only(name) for name in frozen}}
    module.__class__ = type(base.__name__, (base,), namespace)
    return code


def _read_only(name: str) -> property:
    """An attribute whose value fx wrote into the rewritten forward: changing it would not change
    the forward, so it raises instead."""
    def get(self):
        return self.__dict__[name]

    def set_(self, value):
        raise AttributeError(
            f"{type(self).__name__}.{name} is fixed at {self.__dict__[name]!r}: moefx rewrote this module's forward "
            f"with torch.fx, which wrote that value into it; set {name} before moefx.moefy, or put the FFN in an "
            "nn.Module of its own"
        )
    return property(get, set_)


def _detached(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` that no GraphModule owns (pickling the graph would pickle its owner)."""
    detached = fx.Graph()
    detached.output(detached.graph_copy(graph, {}))
    return detached


def _new_inline(base: type, graph: fx.Graph, frozen: frozenset[str]) -> nn.Module:
    """A pickled (or copied) inline-rewritten module, before its state: the object exists (and is
    memoised) first, so state that points back at it points at it, not at a second copy."""
    def __setstate__(self, state):
        base.__setstate__(self, state)
        _set_forward(self, graph, frozen)

    pending = type(base.__name__, (base,), {"__setstate__": __setstate__, _INLINE_CLASS: base, "__module__": base.__module__})
    return base.__new__(pending)


def _record_calls(model: nn.Module, paths: list[str], args, kwargs) -> dict[str, list[tuple[tuple, dict]]]:
    """The arguments of each call of each module when the model ran on the example inputs (in
    eval mode, without gradients; every mode is put back)."""
    if args is None and kwargs is None:
        return {}
    args, kwargs = inputs_to_run(model, args, kwargs)
    calls = {}

    def recorder(path: str):
        def record(module, call_args, call_kwargs):
            calls.setdefault(path, []).append(tree_map_only(torch.Tensor, torch.clone, (call_args, call_kwargs)))
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


def _constants(module: nn.Module, path: str, calls: list[tuple[tuple, dict]], keep) -> dict:
    """fx's ``concrete_args``: the forward's arguments (defaults included) whose value ``keep``s,
    the same in every call. fx would otherwise see a placeholder, for which ``x is None`` is False."""
    signature = inspect.signature(module.forward)
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    seen = []
    for call_args, call_kwargs in calls:
        try:
            bound = signature.bind(*call_args, **call_kwargs)
        except TypeError:
            return {}
        bound.apply_defaults()
        seen.append({name: value for name, value in bound.arguments.items()
                     if signature.parameters[name].kind in plain and keep(value)})
    if any(other != seen[0] for other in seen[1:]):
        raise InlineError(
            f"{path} ({type(module).__name__}) is called with different constant arguments ({seen[0]} and "
            f"{next(o for o in seen if o != seen[0])}), and torch.fx would fix one; put the FFN in an nn.Module of its own"
        )
    return seen[0] if seen else {}


def _trace_both_modes(module: nn.Module, path: str, constants: dict) -> Traced:
    """The module's forward traced by torch.fx; refused when train and eval trace differently."""
    was_training = module.training
    traced = {}
    try:
        for mode in (True, False):
            module.train(mode)
            try:
                graph, frozen = _trace(module, constants)
                traced[mode] = Traced(fx.GraphModule(module, graph, type(module).__name__), frozen)
            except Exception as err:  # noqa: BLE001
                raise InlineError(
                    f"the FFN in {path} ({type(module).__name__}) is written inside its forward, which torch.fx cannot "
                    f"trace on its own ({type(err).__name__}: {err}); put the FFN in an nn.Module of its own"
                ) from err
    finally:
        module.train(was_training)
    if traced[True].gm.code != traced[False].gm.code:
        raise InlineError(
            f"the forward of {path} ({type(module).__name__}) differs between train and eval mode (it reads "
            "self.training, e.g. F.dropout(x, p, self.training)); torch.fx would freeze one mode. Use nn.Dropout "
            "modules, or put the FFN in an nn.Module of its own"
        )
    return traced[was_training]


def _trace(module: nn.Module, constants: dict) -> tuple[fx.Graph, frozenset[str]]:
    """fx's graph of the forward, and the plain attributes it read (their values are in the graph)."""
    cls, reads = type(module), set()

    def __getattribute__(self, name):
        reads.add(name)
        return cls.__getattribute__(self, name)

    module.__class__ = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})
    try:
        graph = _Tracer().trace(module, concrete_args=constants or None)
    finally:
        module.__class__ = cls
    renames = {f"{name}_1": name for name in constants}  # fx names a fixed `mask` `mask_1`; callers say mask=
    for node in graph.nodes:
        if node.op == "placeholder" and node.target in renames:
            node.target = renames[node.target]
    frozen = {
        name for name in reads
        if name in module.__dict__ and not name.startswith("_") and name != "training"
        and not isinstance(module.__dict__[name], nn.Module) and not callable(module.__dict__[name])
    }
    return graph, frozenset(frozen)


def _check_the_trace(gm: fx.GraphModule, module: nn.Module, path: str, calls: list[tuple[tuple, dict]]) -> None:
    """The trace must give the module's own outputs on every call it got (each run on copies of
    the arguments: a forward that updates them in place must not feed the other run; on a random
    copy on the CPU for a module on the meta device)."""
    if not calls:
        log.warning(
            "the trace of %s (%s) is not checked against its forward: it was not called on example inputs", path,
            type(module).__name__,
        )
        return
    if _on_meta(module):
        try:
            module, gm, calls = _random_cpu_copy(module, gm, calls)
        except Exception as err:  # noqa: BLE001
            log.warning("the trace of %s (%s) is not checked: a CPU copy of it failed (%s)", path,
                        type(module).__name__, err)
            return
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        for call in calls:
            runs = []
            for run in (module, gm):
                args, kwargs = tree_map_only(torch.Tensor, torch.clone, call)
                try:
                    with torch.no_grad():
                        out = run(*args, **kwargs)
                except Exception as err:  # noqa: BLE001  (the trace fails where the forward runs: not the forward)
                    out = err
                runs.append(out)
            want, got = runs
            if isinstance(got, Exception) or not _same(tree_flatten(want)[0], tree_flatten(got)[0]):
                raise InlineError(
                    f"torch.fx's trace of {path} ({type(module).__name__}) alone does not reproduce its forward on the "
                    "example inputs (fx cannot see isinstance() or type() tests on arguments); put the FFN in an "
                    "nn.Module of its own"
                )
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _random_cpu_copy(module: nn.Module, gm: fx.GraphModule, calls):
    """The module with random weights on the CPU, its trace on that copy, and random inputs of the
    calls' shapes (integer tensors zero): values to compare where the meta device has none."""
    generator = torch.Generator().manual_seed(0)

    def random_like(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return torch.randn(t.shape, generator=generator).to(t.dtype)
        return torch.zeros(t.shape, dtype=t.dtype)

    copied = copy.deepcopy(module).to_empty(device="cpu")
    with torch.no_grad():
        for t in [*copied.parameters(), *copied.buffers()]:
            t.copy_(random_like(t) * (0.1 if t.is_floating_point() else 1))
    return copied, fx.GraphModule(copied, _detached(gm.graph)), tree_map_only(torch.Tensor, random_like, calls)


def _same(want: list, got: list) -> bool:
    if len(want) != len(got):
        return False
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.numel() == 0:
            continue
        scale = 1 + a.abs().nan_to_num().max().item()
        if not torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5 * scale, equal_nan=True):
            return False
    return True
