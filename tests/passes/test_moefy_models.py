"""moefy on every test model: FFNs counted, upcycle and split equal the dense model, training works."""

from __future__ import annotations

import copy

import pytest
import torch

import moefx
from tests.passes.models import CASES


def _out(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    if hasattr(result, "last_hidden_state"):
        return result.last_hidden_state
    return result[0]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _convert(case, **options):
    model = case.build().eval()
    args, kwargs = case.inputs()
    with torch.no_grad():
        dense = _out(model(*args, **kwargs))
    moefx.moefy(model, example_inputs=args, example_kwargs=kwargs, **options)
    return model, args, kwargs, dense


def test_finds_every_ffn(case):
    model = case.build()
    args, kwargs = case.inputs()
    matches = moefx.find_ffns(model, args, kwargs)
    assert len(matches) == case.ffns
    for m in matches:
        assert m.kind in ("mlp", "glu") and m.d_hidden > m.d_model > 0


@pytest.mark.parametrize("case", [c for c in CASES if c.traceable], ids=lambda c: c.name)
def test_symbolic_trace_finds_the_same_ffns(case):
    model = case.build()
    args, kwargs = case.inputs()
    exported = [(m.path, m.kind, m.d_model, m.d_hidden, m.calls) for m in moefx.find_ffns(model, args, kwargs)]
    traced = [(m.path, m.kind, m.d_model, m.d_hidden, m.calls) for m in moefx.find_ffns(model)]
    assert traced == exported


def test_upcycle_equals_dense(case):
    model, args, kwargs, dense = _convert(case, num_experts=4, top_k=2, init="upcycle")
    layers = list(moefx.moe_layers(model))
    assert len(layers) == case.ffns
    with torch.no_grad():
        assert _rel_err(_out(model(*args, **kwargs)), dense) <= 1e-5


@pytest.mark.parametrize("split_by", ["contiguous", "kmeans"])
def test_split_with_all_experts_equals_dense(case, split_by):
    model, args, kwargs, dense = _convert(case, num_experts=4, top_k=4, init="split", split_by=split_by)
    with torch.no_grad():
        assert _rel_err(_out(model(*args, **kwargs)), dense) <= 1e-5


def test_training_step_reaches_every_moe_parameter(case):
    model, args, kwargs, _ = _convert(case, num_experts=4, top_k=2, init="drop-upcycle")
    model.train()
    out = _out(model(*args, **kwargs))
    aux = moefx.aux_loss(model)
    assert aux.requires_grad and aux.dim() == 0
    (out.float().square().mean() + aux).backward()
    for path, layer in moefx.moe_layers(model):
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{path}.{name}"
            assert p.grad.abs().sum() > 0, f"{path}.{name} got a zero gradient"


def test_moefy_again_converts_nothing_new(case):
    model, args, kwargs, _ = _convert(case, num_experts=4, top_k=2)
    before = copy.deepcopy(model.state_dict())
    assert moefx.find_ffns(model, args, kwargs) == []
    moefx.moefy(model, example_inputs=args, example_kwargs=kwargs, num_experts=4)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
