import pytest
import torch

import moefx

BASE = dict(d_model=8, d_hidden=16, num_experts=4, top_k=2)

BAD = [
    ("num_experts", 0, r"num_experts=0.*>= 1"),
    ("top_k", 0, r"top_k=0.*\[1, num_experts=4\]"),
    ("top_k", 5, r"top_k=5.*\[1, num_experts=4\]"),
    ("capacity_factor", 0.0, r"capacity_factor=0.0.*> 0"),
    ("capacity_factor", -1.5, r"capacity_factor=-1.5.*> 0"),
    ("gate", "expert-choice", r"gate='expert-choice'.*'topk', 'switch', 'gshard', 'noisy_topk', 'sigmoid', 'expert_choice'"),
    ("activation", "swish2", r"activation='swish2'.*silu"),
    ("d_hidden", 0, r"d_hidden=0.*>= 1"),
    ("d_model", -3, r"d_model=-3.*>= 1"),
    ("num_shared_experts", -1, r"num_shared_experts=-1.*>= 0"),
    ("num_experts", True, r"num_experts=True.*integer"),
    ("gated", "no", r"gated='no'.*True or False"),
    ("routed_scale", float("inf"), r"routed_scale=inf.*finite"),
    ("load_balance_coef", None, r"load_balance_coef=None.*finite number"),
    ("router_jitter", "0.1", r"router_jitter='0.1'.*\[0, 1\)"),
    ("activation", ["silu"], r"activation=\['silu'\]"),
    ("feature_axis", 0, r"feature_axis=0.*-1 \(features last\) or 1 \(channels first\)"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_config_names_field_value_and_range(field, value, message):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{message}"):
        moefx.MoEConfig(**{**BASE, field: value})
    with pytest.raises(ValueError, match=rf"MoEConfig\.{message}"):
        moefx.MoE(**{**BASE, field: value})


def test_gates_fix_their_routing_options_and_refuse_contradictions():
    assert moefx.MoEConfig(**{**BASE, "top_k": 1, "gate": "switch"}).renormalize is False
    assert moefx.MoEConfig(**{**BASE, "gate": "noisy_topk"}).softmax_first is False
    assert moefx.MoEConfig(**{**BASE, "renormalize": False}).renormalize is False
    with pytest.raises(ValueError, match=r"renormalize=True.*gate='switch' uses renormalize=False"):
        moefx.MoEConfig(**{**BASE, "top_k": 1, "gate": "switch", "renormalize": True})


SIGMOID = {**BASE, "num_experts": 8, "gate": "sigmoid"}
BAD_SIGMOID = [
    ({**SIGMOID, "expert_groups": 3}, r"expert_groups=3.*divides num_experts=8"),
    ({**SIGMOID, "expert_groups": 4, "topk_groups": 5}, r"topk_groups=5.*\[1, expert_groups=4\]"),
    ({**SIGMOID, "expert_groups": 4, "topk_groups": 1, "top_k": 3}, r"top_k=3.*at most the 2 experts"),
    ({**SIGMOID, "bias_update_rate": -0.1}, r"bias_update_rate=-0.1.*>= 0"),
    ({**SIGMOID, "softmax_first": True}, r"softmax_first=True.*no softmax"),
    ({**BASE, "expert_groups": 2}, r"expert_groups=2.*needs gate='sigmoid'"),
    ({**BASE, "bias_update_rate": 0.001}, r"bias_update_rate=0.001.*needs gate='sigmoid'"),
]


@pytest.mark.parametrize("options,message", BAD_SIGMOID, ids=[m.split("=")[0] + str(i) for i, (_, m) in enumerate(BAD_SIGMOID)])
def test_sigmoid_gate_options_are_checked(options, message):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{message}"):
        moefx.MoEConfig(**options)


def test_sigmoid_gate_defaults():
    config = moefx.MoEConfig(**SIGMOID, expert_groups=4)
    assert (config.renormalize, config.softmax_first, config.topk_groups, config.bias_update_rate) == (True, None, 4, 0.0)
    assert moefx.MoEConfig(**SIGMOID, renormalize=False).renormalize is False


def test_router_kinds_fix_their_top_k():
    with pytest.raises(ValueError, match=r"top_k=2.*gate='switch'"):
        moefx.MoEConfig(**{**BASE, "gate": "switch"})
    with pytest.raises(ValueError, match=r"top_k=1.*gate='gshard'"):
        moefx.MoEConfig(**{**BASE, "top_k": 1, "gate": "gshard"})


def test_config_is_frozen_and_keyword_only():
    config = moefx.MoEConfig(**BASE)
    with pytest.raises(AttributeError):
        config.top_k = 1
    with pytest.raises(TypeError):
        moefx.MoEConfig(8, 16, 4)


def test_capacity_formula():
    config = moefx.MoEConfig(**BASE, capacity_factor=1.25)
    assert config.capacity(100) == 63  # ceil(1.25 * 100 * 2 / 4) = ceil(62.5)
    assert moefx.MoEConfig(**BASE).capacity(100) is None
    # 1.1 * 50 * 2 / 10 is 11 exactly; float arithmetic would give ceil(11.000000000000002) = 12.
    assert moefx.MoEConfig(**{**BASE, "num_experts": 10}, capacity_factor=1.1).capacity(50) == 11


def test_callable_activation_is_accepted():
    layer = moefx.MoE(**BASE, activation=lambda h: h * 2)
    assert layer.experts.mid.act(torch.ones(1)).item() == 2
