"""The adoption check of a large block (``FLOAT64_BYTES`` set to 0 here, so tiny blocks take that path):
it holds no copy of the block, yet adopts right conversions and refuses wrong ones, in float32 and bfloat16."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import moefx
from moefx.layer.moe import MoE
from moefx.passes.adopt import verify
from moefx.passes.adopt.fused_experts import match_fused_experts
from tests.passes.adopt_models import ClassicModel, DampedMoE, hf_model

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def large(monkeypatch):
    """Every block checked in place; the float64 check (its copies) fails the test if it runs."""
    monkeypatch.setattr(verify, "FLOAT64_BYTES", 0)

    def float64_check(*args, **kwargs):
        raise AssertionError("the float64 check with its copies ran")
    monkeypatch.setattr(verify, "_compare", float64_check)


def _relative(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_right_adoptions_pass_the_in_place_check(large, family):
    model = hf_model(family)
    with torch.no_grad():
        want = model(IDS).logits
    moefx.moefy(model, example_inputs=(IDS,))
    assert len(list(moefx.moe_layers(model))) == 2
    with torch.no_grad():
        assert _relative(model(IDS).logits, want) <= 1e-5


def test_a_classic_moe_passes_and_a_block_that_computes_more_is_refused(large):
    classic = ClassicModel().eval()
    h = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))  # the block's input
    with torch.no_grad():
        want = classic.moe(h)
    moefx.moefy(classic, example_inputs=(torch.randn(3, 5, 8),))
    assert isinstance(classic.moe, MoE)
    with torch.no_grad():
        assert _relative(classic.moe(h), want) <= 1e-5
    damped = torch.nn.Sequential(torch.nn.Linear(8, 32), DampedMoE()).eval()
    with pytest.raises(moefx.passes.driver.NoFFNFound, match=r"1: .*differs from it by .* probe tokens"):
        moefx.moefy(damped, example_inputs=(torch.randn(3, 5, 8),))


def _gate_up_swapped(spec):
    H = spec.in_proj.shape[1] // 2
    return replace(spec, in_proj=torch.cat((spec.in_proj[:, H:], spec.in_proj[:, :H]), dim=1))


def _not_renormalized(spec):
    return replace(spec, routing=replace(spec.routing, renormalize=not spec.routing.renormalize))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wrong", [_gate_up_swapped, _not_renormalized])
def test_wrong_conversions_are_refused_in_the_blocks_dtype(large, dtype, wrong):
    block = hf_model("mixtral").to(dtype).model.layers[0].mlp
    spec = match_fused_experts("model.layers.0.mlp", block, None)
    assert not isinstance(verify.verified(block, spec), str)  # the right one passes in this dtype
    refused = verify.verified(block, wrong(spec))
    assert isinstance(refused, str) and "differs from it by" in refused, refused
