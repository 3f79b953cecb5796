"""forward_override: pass a module's output through a function while torch.export traces it.

An instance attribute shadows the class's ``forward`` for the duration; ``functools.wraps`` keeps
the signature export reads, and no wrapper module is added, so the graph's module paths and
parameter names stay the model's own. A ``forward`` the user set on the instance is put back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def forward_override(model: nn.Module, on_output: Callable) -> Iterator[None]:
    forward, own_forward = model.forward, model.__dict__.get("forward")
    model.forward = functools.wraps(forward)(lambda *args, **kwargs: on_output(forward(*args, **kwargs)))
    try:
        yield
    finally:
        if own_forward is None:
            del model.forward
        else:
            model.forward = own_forward
