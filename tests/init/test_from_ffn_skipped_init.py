"""MoE.from_ffn skips the experts' random init where the strategy overwrites every expert tensor, and
the layer it builds is bit for bit the one built with that init (every random value in its place)."""

import pytest
import torch
from torch import nn

import moefx
import moefx.init.from_ffn as from_ffn
from moefx.init.seeding import seeded
from moefx.layer.experts import GroupedExperts

CASES = [  # init, shared experts, router init
    ("upcycle", 0, "random"), ("upcycle", 1, "random"), ("split", 0, "weights"), ("split", 0, "random"),
    ("split", 2, "weights"), ("drop-upcycle", 0, "random"), ("drop-upcycle", 1, "random"), ("random", 0, "random"),
]


def _template(bias: bool):
    torch.manual_seed(3)
    up, down, gate = (nn.Linear(16, 32, bias=bias), nn.Linear(32, 16, bias=bias), nn.Linear(16, 32, bias=bias))
    return moefx.FFNTemplate.from_linears(up, down, nn.SiLU(), gate=gate)


def _build(template, init, shared, router_init):
    with seeded(7, "model.layers.0.mlp", "cpu"):
        return moefx.MoE.from_ffn(template, num_experts=4, top_k=2, init=init, router_init=router_init,
                                  num_shared_experts=shared)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("init,shared,router_init", CASES)
def test_layer_equals_the_one_built_with_the_experts_random_init(monkeypatch, bias, init, shared, router_init):
    template = _template(bias)
    built = _build(template, init, shared, router_init)
    with monkeypatch.context() as patch:  # the reference: the experts always get their random init first
        patch.setattr(from_ffn, "_fills_experts_alone", lambda *_: False)
        reference = _build(template, init, shared, router_init)
    assert built.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor), name


@pytest.mark.parametrize("init,shared,router_init", CASES)
def test_experts_random_init_runs_only_where_it_matters(monkeypatch, init, shared, router_init):
    calls = []
    original = GroupedExperts.reset_parameters
    monkeypatch.setattr(GroupedExperts, "reset_parameters", lambda self: calls.append(1) or original(self))
    _build(_template(False), init, shared, router_init)
    # upcycle and split overwrite every expert tensor; a shared expert or drop-upcycle draws after the init
    wasted = init in ("upcycle", "split") and not shared
    assert len(calls) == (0 if wasted else 1)
