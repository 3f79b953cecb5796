"""The activation catalogue (moefx.layer.activations) names each of its activations, and the passes
name each one the same when it is written as ops in a captured graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moefx
from moefx.layer.activations import ACTIVATIONS, CATALOGUE, computes, identify, make_activation

X = torch.randn(2, 5, 16)
# Not found as an FFN whatever the probe says: nothing between the projections (identity), or an
# op the graph's pointwise table does not know (aten.hardswish is not tagged pointwise).
NOT_AN_FFN = {"identity", "hardswish"}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_the_catalogue_names_each_activation(name):
    entry = CATALOGUE[name]
    assert identify(entry.computes) == name
    if name in ACTIVATIONS:
        module = make_activation(name)
        assert identify(module) == name and computes(module, name)


def test_the_catalogue_names_nothing_else():
    assert identify(lambda x: torch.clamp(x, -1, 2) * 3) is None
    assert identify(lambda x: x.sum()) is None, "not one value per element"
    assert identify(nn.Sequential(nn.SiLU(), nn.Dropout(0.5))) is None, "a dropout counts (training mode)"
    assert identify(lambda x: 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * x**3)))) == "gelu_tanh", (
        "a truncated constant is within the tolerance"
    )


class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


class _FFN(nn.Module):
    def __init__(self, fn, as_module: bool) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.act, self.fn = (_Fn(fn), None) if as_module else (None, fn)

    def forward(self, x):
        h = self.up(x)
        return self.down(self.act(h) if self.act is not None else self.fn(h))


@pytest.mark.parametrize("inputs", [(X,), None], ids=["export", "symbolic_trace"])
@pytest.mark.parametrize("name", [n for n in CATALOGUE if n not in NOT_AN_FFN])
def test_each_named_activation_written_as_ops_is_named_so(name, inputs):
    for as_module in (True, False):  # its own module (kept as it is), or ops in the FFN's forward (copied out)
        (match,) = moefx.find_ffns(nn.Sequential(_FFN(CATALOGUE[name].computes, as_module)), inputs)
        assert match.activation == name


@pytest.mark.parametrize("name", ["gelu_tanh", "mish"])
def test_the_rewrite_builds_the_activation_the_match_describes(name):
    model = nn.Sequential(_FFN(CATALOGUE[name].computes, as_module=False)).eval()
    dense = model(X)
    (match,) = moefx.find_ffns(model, (X,))
    assert not any(isinstance(v, nn.Module) for p in match.placement.pieces for v in vars(p).values()), (
        "find_ffn describes the activation; it builds no module"
    )
    moefx.moefy(model, 4, 2, example_inputs=(X,))
    (act,) = [m for path, m in model.named_modules() if path.endswith("mid.act")]
    # A catalogue activation with a module is built from the catalogue; any other from the FFN's own ops.
    assert isinstance(act, torch.fx.GraphModule) == (name not in ACTIVATIONS)
    torch.testing.assert_close(model(X), dense, rtol=1e-5, atol=1e-6)
