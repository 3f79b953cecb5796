"""check: the trace of a module must give its forward's outputs on every call it got.

    for each recorded call:  module(*call) == trace(*call)     (a random CPU copy for a meta module)
      else InlineError: "torch.fx's trace of blocks.0 (Block) alone does not reproduce its forward ..."

fx cannot see an ``isinstance``/``type`` test on an argument and silently keeps one side, so the
trace must give the forward's outputs on each call the module got when the model ran on the
example inputs; a module on the meta device is compared on a random copy on the CPU.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map_only

from moefx.passes.capture import on_meta
from moefx.passes.graph.ops import detached_copy
from moefx.passes.inline.errors import InlineError
from moefx.passes.inline.record_calls import Call

log = logging.getLogger(__name__)


def check_the_trace(gm: fx.GraphModule, module: nn.Module, path: str, calls: list[Call]) -> None:
    """The trace must give the module's own outputs on every call it got (each run on copies of
    the arguments: a forward that updates them in place must not feed the other run; on a random
    copy on the CPU for a module on the meta device)."""
    if not calls:
        log.warning(
            "the trace of %s (%s) is not checked against its forward: it was not called on example inputs", path,
            type(module).__name__,
        )
        return
    if on_meta(module):
        try:
            module, gm, calls = _random_cpu_copy(module, gm, calls)
        except Exception as err:
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
                except Exception as err:
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
    return copied, fx.GraphModule(copied, detached_copy(gm.graph)), tree_map_only(torch.Tensor, random_like, calls)


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
