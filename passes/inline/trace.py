"""trace: one module's forward as a torch.fx graph of its own, checked before any change.

    blocks.0 (Block)                          Traced(gm, frozen={"scale"})
      forward(x, mask=None):           ─▶       graph(x): %up = linear(x, up.weight) ...
        h = x * self.scale                        (mask=None fixed, self.scale's value in the graph)

The module is traced by torch.fx alone, with the arguments that were None on the example inputs
fixed (fx's guard then refuses another value; other constants are fixed only if fx needs them,
``if flag:``), and every call the module got when the model ran on the example inputs must agree
on them. A forward that reads ``self.training`` (train and eval trace differently) is refused.
The trace is canonicalized, then checked against the forward on the recorded calls (``check``).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

from torch import fx, nn

from moefx.passes.canonicalize import canonicalize
from moefx.passes.capture import trace_graph
from moefx.passes.inline.check import check_the_trace
from moefx.passes.inline.errors import InlineError
from moefx.passes.inline.record_calls import Call

log = logging.getLogger(__name__)


@dataclass
class Traced:
    gm: fx.GraphModule  # the module's forward as a graph (rewritten FFN by FFN)
    frozen: frozenset[str]  # plain attributes the forward reads: fx wrote their values into the graph


def checked_trace(module: nn.Module, path: str, calls: list[Call]) -> Traced:
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
    check_the_trace(traced.gm, module, path, calls)
    if constants:
        log.warning("%s (%s): the rewritten forward fixes %s, as on the example inputs; a call with another value "
                    "raises", path, type(module).__name__, ", ".join(f"{k}={v!r}" for k, v in constants.items()))
    return traced


def _constants(module: nn.Module, path: str, calls: list[Call], keep) -> dict:
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
            except Exception as err:
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
        graph = trace_graph(module, concrete_args=constants or None)
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
