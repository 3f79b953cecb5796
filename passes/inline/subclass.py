"""subclass: a rewritten graph becomes the forward of one module object, and pickles as such.

    before: type(blocks[0]) is Block            after: type(blocks[0]) is Block' (a subclass made for
                                                       that object): forward = the graph's code,
                                                       self.scale read-only, isinstance(_, Block) holds

Its other weights, attributes, methods and ``isinstance`` stay. The plain attributes the forward
read (``self.scale``) are values in the graph now, so they become read-only. Pickled (or copied),
the module is rebuilt as the user's class, the graph and the state.
"""

from __future__ import annotations

from torch import fx, nn

from moefx.passes.graph.ops import detached_copy

_INLINE_CLASS = "_moefx_inline_base"  # set on the subclasses made here: the user's class they extend


def set_forward(module: nn.Module, graph: fx.Graph, frozen: frozenset[str]) -> fx.GraphModule:
    """Make ``graph`` the forward of ``module`` alone: its class becomes a subclass, for this object,
    of the user's class, whose forward is the graph's code (which reads the module's attributes).
    The plain attributes the graph holds the values of become read-only. Returns the code as a
    GraphModule, for a next FFN of the same module."""
    base = getattr(type(module), _INLINE_CLASS, type(module))
    code = fx.GraphModule(module, graph, base.__name__)

    def __reduce_ex__(self, protocol):  # pickled as the user's class, the graph and the state
        return new_inline, (base, detached_copy(graph), frozen), dict(self.__dict__)

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


def new_inline(base: type, graph: fx.Graph, frozen: frozenset[str]) -> nn.Module:
    """A pickled (or copied) inline-rewritten module, before its state: the object exists (and is
    memoised) first, so state that points back at it points at it, not at a second copy."""
    def __setstate__(self, state):
        base.__setstate__(self, state)
        set_forward(self, graph, frozen)

    pending = type(base.__name__, (base,), {"__setstate__": __setstate__, _INLINE_CLASS: base, "__module__": base.__module__})
    return base.__new__(pending)
