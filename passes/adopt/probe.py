"""Probe inputs for adoption, and a dense FFN read from a module of its own by find_ffn."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moefx.init.template import FFNTemplate
from moefx.passes.canonicalize import canonicalize
from moefx.passes.capture import capture
from moefx.passes.find_ffn import find_ffn
from moefx.passes.rewrite import _template

PROBE_TOKENS = 64  # enough tokens that every expert and every routing form shows


def probe_tokens(d_model: int, *, dtype=torch.float32, device=None, shape: tuple[int, ...] = (PROBE_TOKENS,)) -> Tensor:
    """Fixed random tokens ``shape + (d_model,)`` (the same every call: conversions are repeatable)."""
    x = torch.randn(*shape, d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return x.to(dtype=dtype, device=device)


def dense_ffn_of(module: nn.Module, d_model: int) -> FFNTemplate | str:
    """``module`` as one dense FFN (find_ffn on its own graph: the whole module must be that FFN),
    or why not."""
    x = probe_tokens(d_model, dtype=next(module.parameters()).dtype, shape=(4,))
    wrapped = nn.Sequential(module)  # find_ffn places an FFN in a submodule, never the root
    try:
        gm = capture(wrapped, (x,)).graph_module
    except Exception as err:  # a module the tracers cannot follow is not an expert moefx can read
        return f"it cannot be captured: {type(err).__name__}"
    canonicalize(gm)
    found = find_ffn(gm)
    if len(found.matches) != 1:
        return f"{len(found.matches)} FFNs found in it, not one"
    template = _template(wrapped, found.matches[0])
    with torch.no_grad():
        same = torch.allclose(template.dense_forward(x), module(x), rtol=1e-5, atol=1e-6)
    return template if same else "it computes more than its FFN"
