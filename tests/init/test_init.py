"""Layers built from a dense FFN: the equalities the init strategies promise."""

import pytest
import torch
from torch import nn

import moefx


def _template(gated: bool, bias: bool, d=12, h=24, activation=None):
    torch.manual_seed(1)
    up, down = nn.Linear(d, h, bias=bias, dtype=torch.float64), nn.Linear(h, d, bias=bias, dtype=torch.float64)
    gate = nn.Linear(d, h, bias=bias, dtype=torch.float64) if gated else None
    return moefx.FFNTemplate.from_linears(up, down, activation or (nn.SiLU() if gated else nn.GELU()), gate=gate)


FORMS = [(True, False), (True, True), (False, False), (False, True)]


@pytest.mark.parametrize("gated,bias", FORMS)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_upcycled_layer_equals_the_dense_ffn(gated, bias, top_k):
    template = _template(gated, bias)
    layer = moefx.MoE.from_ffn(template, num_experts=4, top_k=top_k, init="upcycle")
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), template.dense_forward(x))
    assert len(set(layer.stats().tokens_per_expert.tolist())) > 1 or top_k == 4, "routing should not be trivial"


@pytest.mark.parametrize("gated,bias", FORMS)
@pytest.mark.parametrize("num_experts", [2, 4, 8])
@pytest.mark.parametrize("split_by", ["contiguous", "kmeans"])
def test_split_layer_with_all_experts_active_equals_the_dense_ffn(gated, bias, num_experts, split_by):
    template = _template(gated, bias)
    layer = moefx.MoE.from_ffn(template, num_experts=num_experts, top_k=num_experts, init="split", split_by=split_by)
    assert layer.config.d_hidden == 24 // num_experts
    x = torch.randn(7, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), template.dense_forward(x))


def test_split_experts_hold_disjoint_neurons():
    template = _template(gated=False, bias=False)
    layer = moefx.MoE.from_ffn(template, num_experts=3, top_k=3, init="split")
    torch.testing.assert_close(layer.experts.in_proj.reshape(24, 12), template.up_weight)


def test_kmeans_split_puts_neurons_with_similar_input_rows_in_one_expert():
    torch.manual_seed(3)
    directions = torch.randn(4, 12, dtype=torch.float64) * 5
    order = torch.randperm(24)  # 4 groups of 6 near-identical rows, shuffled among the 24 neurons
    up_rows = (directions.repeat_interleave(6, 0) + 0.01 * torch.randn(24, 12, dtype=torch.float64))[order]
    group_of_neuron = torch.arange(4).repeat_interleave(6)[order]
    up, down = nn.Linear(12, 24, bias=False, dtype=torch.float64), nn.Linear(24, 12, bias=False, dtype=torch.float64)
    up.weight.data.copy_(up_rows)
    template = moefx.FFNTemplate.from_linears(up, down, nn.GELU())
    layer = moefx.MoE.from_ffn(template, num_experts=4, top_k=4, init="split", split_by="kmeans")
    for e in range(4):
        held = [int(torch.where((up_rows == row).all(1))[0]) for row in layer.experts.in_proj[e]]
        assert len({int(group_of_neuron[n]) for n in held}) == 1, f"expert {e} mixes groups"
        torch.testing.assert_close(layer.experts.out_proj[e], down.weight[:, held])


def test_unknown_split_method_is_refused():
    with pytest.raises(ValueError, match=r"split_by='random' is unknown: must be one of \['contiguous', 'kmeans'\]"):
        moefx.MoE.from_ffn(_template(False, False), num_experts=2, top_k=2, init="split", split_by="random")


@pytest.mark.parametrize("gate_first", [True, False])
def test_fused_gate_up_template_splits_the_halves(gate_first):
    torch.manual_seed(2)
    gate, up = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    down = torch.randn(8, 16, dtype=torch.float64)
    fused = torch.cat([gate, up] if gate_first else [up, gate])
    template = moefx.FFNTemplate.from_fused_gate_up(fused, down, nn.SiLU(), gate_first=gate_first)
    x = torch.randn(5, 8, dtype=torch.float64)
    dense = (nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(template.dense_forward(x), dense)
    layer = moefx.MoE.from_ffn(template, num_experts=4, top_k=2)
    torch.testing.assert_close(layer(x), dense)


def test_any_elementwise_activation_module_is_used():
    template = _template(gated=False, bias=True, activation=nn.Softplus(beta=2.0))
    layer = moefx.MoE.from_ffn(template, num_experts=3, top_k=2)
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), template.dense_forward(x))


def test_drop_upcycle_redraws_the_given_fraction_of_neurons():
    template = _template(gated=True, bias=False)
    layer = moefx.MoE.from_ffn(template, num_experts=4, top_k=2, init="drop-upcycle", drop_fraction=0.25)
    dense_in = torch.cat([template.gate_weight, template.up_weight])
    for e in range(4):
        changed_rows = (layer.experts.in_proj[e] != dense_in).any(dim=1)
        assert int(changed_rows.sum()) == 2 * round(0.25 * 24)
    assert not torch.equal(layer.experts.in_proj[0], layer.experts.in_proj[1])


def test_random_init_keeps_shapes_only():
    template = _template(gated=True, bias=False)
    layer = moefx.MoE.from_ffn(template, num_experts=4, top_k=2, init="random")
    assert layer.experts.in_proj.shape == (4, 48, 12)
    assert not torch.equal(layer.experts.in_proj[0, :24], template.gate_weight)


def test_template_on_meta_device_builds_a_meta_layer():
    with torch.device("meta"):
        template = _template(gated=True, bias=True, d=4096, h=14336)
    layer = moefx.MoE.from_ffn(template, num_experts=8, top_k=2)
    assert layer.experts.in_proj.is_meta and layer.experts.in_proj.shape == (8, 2 * 14336, 4096)


def test_bad_template_and_options_are_refused():
    with pytest.raises(ValueError, match=r"down_weight has shape \(5, 7\), expected \(4, 8\)"):
        moefx.FFNTemplate(up_weight=torch.zeros(8, 4), down_weight=torch.zeros(5, 7), activation="relu")
    template = _template(gated=False, bias=False)
    with pytest.raises(ValueError, match=r"d_hidden=24 among num_experts=5"):
        moefx.MoE.from_ffn(template, num_experts=5, top_k=5, init="split")
    with pytest.raises(ValueError, match=r"init='copy'.*upcycle"):
        moefx.MoE.from_ffn(template, num_experts=4, init="copy")
