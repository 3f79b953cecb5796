"""moefy adopts existing MoE blocks: transformers 5 families and a hand-written classic MoE become
moefx MoE layers with the same weights and routing (outputs equal the original's, fp32, eval)."""

from __future__ import annotations

import copy

import pytest
import torch

import moefx
from moefx.layer.moe import MoE
from moefx.passes.adopt import AdoptionError
from tests.passes.adopt_models import ClassicModel, DampedMoE, IndexedMoE, hf_model

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))

CASES = {
    "mixtral": {}, "qwen2_moe": {}, "qwen3_moe": {"norm_topk_prob": True}, "qwen3_moe_plain": {"norm_topk_prob": False},
    "olmoe": {}, "granitemoe": {}, "deepseek_v3": {}, "gpt_oss": {},
}


def _family(case: str) -> str:
    return case.removesuffix("_plain")


def _relative(got, want) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_adopted_family_keeps_its_outputs_and_trains(case):
    model = hf_model(_family(case), **CASES[case])
    original = copy.deepcopy(model)
    moefx.moefy(model, example_inputs=(IDS,))
    layers = dict(moefx.moe_layers(model))
    blocks = [n for n, m in original.named_modules() if type(m).__name__.endswith(("SparseMoeBlock", "MoE", "MLP"))
              and hasattr(m, "experts")]
    assert blocks and set(blocks) <= set(layers)  # every MoE block (DeepSeek-V3's dense layer 0 too)
    for path in blocks:  # the adopted layer holds the block's own expert weights
        experts = original.get_submodule(path).experts
        assert layers[path].config.num_experts == experts.num_experts
    with torch.no_grad():
        assert _relative(model(IDS).logits, original(IDS).logits) <= 1e-5
    model.train()
    out = model(IDS, labels=IDS)
    (out.loss + moefx.aux_loss(model)).backward()
    grads = [layer.experts.in_proj.grad for layer in layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_blocks_with_eager_expert_loops_are_adopted_before_capture():
    """transformers' eager experts loop over the experts hit (a data-dependent loop torch.export
    cannot follow): the original model does not capture, the adopted one does."""
    model = hf_model("deepseek_v3")
    model.set_experts_implementation("eager")
    original = copy.deepcopy(model)
    with pytest.raises(moefx.passes.capture.CaptureError, match="expert_hit"):
        moefx.find_ffns(original, example_inputs=(IDS,))
    moefx.moefy(model, example_inputs=(IDS,))
    assert set(dict(moefx.moe_layers(model))) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    with torch.no_grad():
        assert _relative(model(IDS).logits, original(IDS).logits) <= 1e-5


def test_deepseek_dense_layers_convert_per_the_options():
    model = hf_model("deepseek_v3")
    moefx.moefy(model, example_inputs=(IDS,), num_experts=8, top_k=2)
    layers = dict(moefx.moe_layers(model))
    assert set(layers) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    dense, adopted = layers["model.layers.0.mlp"].config, layers["model.layers.1.mlp"].config
    assert (dense.gate, dense.d_hidden) == ("topk", 48)  # upcycled from the dense FFN
    assert (adopted.gate, adopted.expert_groups, adopted.topk_groups, adopted.routed_scale) == ("sigmoid", 4, 2, 2.5)
    assert adopted.num_shared_experts == 1


@pytest.mark.parametrize("option", [{"num_experts": 6}, {"top_k": 1}, {"init": "split"}])
def test_an_option_that_contradicts_an_adopted_block_names_it(option):
    model = hf_model("mixtral")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdoptionError, match="model.layers.0.mlp"):
        moefx.moefy(model, example_inputs=(IDS,), **option)
    assert not any(True for _ in moefx.moe_layers(model))  # nothing was changed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_later_failure_puts_the_adopted_blocks_back():
    model = hf_model("deepseek_v3")  # adopted layer 1, then include leaves no dense FFN: moefy fails
    blocks = [model.get_submodule(f"model.layers.{i}.mlp") for i in (0, 1)]
    with pytest.raises(ValueError, match="leave none"):
        moefx.moefy(model, example_inputs=(IDS,), include="nothing.*")
    assert [model.get_submodule(f"model.layers.{i}.mlp") for i in (0, 1)] == blocks
    assert moefx.passes.record.conversions(model) == ()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss"])
def test_aux_loss_equals_the_familys_own(family):
    """One MoE layer, so transformers' aux loss (it pools every layer's tokens) is that layer's."""
    model = hf_model(family, router_aux_loss_coef=0.02, num_hidden_layers=1,
                     **({"layer_types": ["full_attention"]} if family == "gpt_oss" else {}))
    want = 0.02 * model(IDS, output_router_logits=True).aux_loss
    moefx.moefy(model, example_inputs=(IDS,))
    model(IDS)
    assert torch.allclose(moefx.aux_loss(model), want, rtol=1e-5)


def test_classic_moe_is_found_on_the_graph_and_dense_ffns_convert():
    model = ClassicModel().eval()
    x = torch.randn(3, 5, 8)
    original = copy.deepcopy(model)
    moefx.moefy(model, example_inputs=(x,), num_experts=4, top_k=2)
    assert isinstance(model.moe, MoE) and isinstance(model.ffn, MoE)
    assert model.moe.config.activation == "gelu" and model.moe.config.top_k == 2
    with torch.no_grad():
        assert _relative(model(x), original(x)) <= 1e-5
    model.train()
    model(x).sum().backward()
    assert model.moe.router.weight.grad is not None


def test_classic_moe_without_renormalisation_is_adopted_as_such():
    model = ClassicModel(renormalize=False).eval()
    x = torch.randn(3, 5, 8)
    want = model(x)
    moefx.moefy(model, example_inputs=(x,))
    assert model.moe.config.renormalize is False
    assert _relative(model(x), want) <= 1e-5


def test_classic_moe_with_a_data_dependent_loop_is_adopted():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), IndexedMoE(top_k=1, renormalize=False)).eval()
    x = torch.randn(3, 5, 8)
    want = model(x)
    moefx.moefy(model, example_inputs=(x,))
    layer = model[1]
    assert isinstance(layer, MoE) and (layer.config.top_k, layer.config.renormalize) == (1, False)
    assert _relative(model(x), want) <= 1e-5


def test_a_classic_looking_block_that_computes_more_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), DampedMoE()).eval()
    with pytest.raises(moefx.passes.driver.NoFFNFound, match=r"1: .*differs from it by"):
        moefx.moefy(model, example_inputs=(torch.randn(3, 5, 8),))
    assert isinstance(model[1], DampedMoE)


def test_a_block_moefx_cannot_express_is_refused_with_the_reason(caplog):
    model = hf_model("mixtral", router_jitter_noise=0.1)  # jitter scales the experts' input too
    with pytest.raises(moefx.passes.driver.NoFFNFound, match="jitter"):
        moefx.moefy(model, example_inputs=(IDS,))
    assert not any(True for _ in moefx.moe_layers(model))
