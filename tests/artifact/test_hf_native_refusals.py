"""What a native MoE family cannot express is refused before anything is written, naming what and
the way out (--format moefx)."""

import pytest
import torch

import moefx
from moefx.artifact.hf_native import NativeFormatError, write_native
from tests.artifact.hf_native_cases import dense_model, token_ids

IDS = token_ids()


def _refused(model, tmp_path, *expected: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(NativeFormatError) as caught:
        write_native(model, out)
    message = str(caught.value)
    for part in expected:
        assert part in message, message
    assert "--format moefx" in message or "moefx.parallelize" in message or "convert it first" in message, message
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing written, no temporary left


@pytest.mark.parametrize(("options", "named"), [
    ({"gate": "switch", "top_k": 1}, "gate='switch'"),
    ({"gate": "sigmoid"}, "gate='sigmoid'"),
    ({"capacity_factor": 1.25}, "capacity_factor=1.25"),
    ({"init": "split", "top_k": 4}, "routed_scale=4"),
    ({"num_shared_experts": 1}, "num_shared_experts=1"),
    ({"router_jitter": 0.1}, "router_jitter=0.1"),
    ({"renormalize": False}, "renormalize=False"),  # Mixtral always renormalises (Qwen-MoE says norm_topk_prob)
])
def test_layer_options_mixtral_cannot_express(tmp_path, options, named):
    model = moefx.moefy(dense_model("llama"), num_experts=4, **{"top_k": 2, **options}, example_inputs=(IDS,))
    _refused(model, tmp_path, "mixtral cannot express the MoE layer at model.layers.0.mlp", named)


def test_expert_biases(tmp_path):
    model = moefx.moefy(dense_model("llama", mlp_bias=True), num_experts=2, top_k=1, example_inputs=(IDS,))
    _refused(model, tmp_path, "expert biases (bias=True)")


def test_a_dense_field_mixtral_lacks(tmp_path):
    model = moefx.moefy(dense_model("llama", attention_bias=True), num_experts=2, top_k=1, example_inputs=(IDS,))
    _refused(model, tmp_path, "mixtral has no attention_bias", "attention_bias=True")


def test_qwen3_sliding_window_over_some_layers(tmp_path):
    model = dense_model("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    moefx.moefy(model, num_experts=2, top_k=1, example_inputs=(IDS,))
    _refused(model, tmp_path, "qwen3_moe has no use_sliding_window", "use_sliding_window=True")


def test_layers_left_dense_where_the_family_cannot_say_so(tmp_path):
    model = moefx.moefy(dense_model("mistral"), num_experts=2, top_k=1, include=["model.layers.1.mlp"],
                        example_inputs=(IDS,))
    _refused(model, tmp_path, "layers [0] were left dense", "no --include/--exclude/--every")


def test_layers_that_differ(tmp_path):
    model = dense_model("qwen2")
    moefx.moefy(model, num_experts=2, top_k=1, include=["model.layers.0.mlp"], example_inputs=(IDS,))
    moefx.moefy(model, num_experts=4, top_k=1, include=["model.layers.1.mlp"], example_inputs=(IDS,))
    _refused(model, tmp_path, "the MoE layers differ", "num_experts: 2 at model.layers.0.mlp, 4 at model.layers.1.mlp")


def test_a_model_with_no_native_family(tmp_path):
    model = transformers_gpt2()
    moefx.moefy(model, num_experts=2, top_k=1, example_inputs=(IDS,))
    _refused(model, tmp_path, "GPT2LMHeadModel (model_type 'gpt2') has no native MoE family", "llama -> mixtral")


def test_a_model_not_converted(tmp_path):
    _refused(dense_model("llama"), tmp_path, "has no MoE layer")


def test_a_meta_model_needs_a_plan(tmp_path):
    model = moefx.moefy(dense_model("llama"), num_experts=2, top_k=1, example_inputs=(IDS,))
    model.to("meta")
    with pytest.raises(NativeFormatError, match="meta device: pass plan="):
        write_native(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_bad_shard_size(tmp_path):
    model = moefx.moefy(dense_model("llama"), num_experts=2, top_k=1, example_inputs=(IDS,))
    with pytest.raises(ValueError, match="max_shard_size='5 apples' is not a size"):
        write_native(model, tmp_path / "out", max_shard_size="5 apples")
    assert not (tmp_path / "out").exists()


def transformers_gpt2():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()
