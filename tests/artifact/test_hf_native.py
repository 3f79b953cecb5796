"""Native MoE checkpoints: a dense model of each family, converted, written with write_native and
loaded by transformers alone (a process that never imports moefx) gives the same logits and the
same greedy tokens: as the dense model after an upcycle, and as the moefx model once its experts
and routers differ (so that routing, expert order and gate/up order all show)."""

import copy
import json

import pytest
import torch

import moefx
from moefx.artifact.hf_native import write_native
from tests.artifact.hf_native_cases import DENSE, dense_model, greedy, load_without_moefx, logits, relative_error, token_ids

OPTIONS = {  # per family: conversion options that exercise what it can say
    "llama": {}, "mistral": {},
    "qwen2": {"renormalize": False},  # norm_topk_prob=False
    "qwen3": {"include": ["model.layers.1.mlp"]},  # layer 0 left dense: mlp_only_layers=[0]
    "granite": {"softmax_first": False},  # softmax over the k chosen logits, as GraniteMoe's router
    "olmo2": {},
}
EXPECTED = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
            "qwen3": "Qwen3MoeForCausalLM", "granite": "GraniteMoeForCausalLM", "olmo2": "FlexOlmoForCausalLM"}


def _perturb_experts(model) -> None:
    """Experts and routers made distinct, so that a wrong expert, order or routing changes the output."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in moefx.moe_layers(model):
            for p in (layer.experts.in_proj, layer.experts.out_proj):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every family written twice (upcycled; then with distinct experts, in small shards), and all
    loaded in one moefx-free process."""
    work = tmp_path_factory.mktemp("native")
    ids = token_ids()
    expected, jobs = {}, {}
    for family in DENSE:
        model = dense_model(family)
        dense = {"logits": logits(model, ids), "tokens": greedy(model, ids)}
        moefx.moefy(model, num_experts=4, top_k=2, example_inputs=(ids,), **OPTIONS[family])
        upcycled = {"logits": logits(model, ids), "tokens": greedy(model, ids)}
        jobs[f"{family}-upcycled"] = write_native(model, work / f"{family}-upcycled")
        _perturb_experts(model)
        moe = {"logits": logits(model, ids), "tokens": greedy(model, ids)}
        jobs[f"{family}-trained"] = write_native(model, work / f"{family}-trained", max_shard_size="40KB")
        expected[family] = {"dense": dense, "upcycled": upcycled, "moe": moe}
    return expected, load_without_moefx(jobs, ids, work), work


@pytest.mark.parametrize("family", list(DENSE))
def test_upcycled_native_checkpoint_equals_the_dense_model(written, family):
    """Renormalised top-k upcycling is the dense model exactly; without renormalisation (Qwen2 here)
    each token's FFN output is scaled by its top-k probability mass, as in the moefx model."""
    expected, loaded, _ = written
    got = loaded[f"{family}-upcycled"]
    assert got["class"] == EXPECTED[family] and not got["problems"], got["problems"]
    reference = expected[family]["upcycled" if OPTIONS[family].get("renormalize") is False else "dense"]
    assert relative_error(got["logits"], reference["logits"]) <= 1e-5
    assert torch.equal(got["tokens"], reference["tokens"])


@pytest.mark.parametrize("family", list(DENSE))
def test_native_checkpoint_equals_the_moefx_model(written, family):
    expected, loaded, work = written
    got = loaded[f"{family}-trained"]
    assert got["class"] == EXPECTED[family] and not got["problems"], got["problems"]
    assert relative_error(got["logits"], expected[family]["moe"]["logits"]) <= 1e-5
    assert torch.equal(got["tokens"], expected[family]["moe"]["tokens"])
    # the perturbation must matter, or this test would not see a wrong expert
    assert relative_error(expected[family]["moe"]["logits"], expected[family]["dense"]["logits"]) > 1e-3
    index = json.loads((work / f"{family}-trained" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # 40KB shards: several files


def test_config_carries_the_moe_fields(written):
    _, loaded, _ = written
    mixtral = loaded["llama-trained"]["config"]
    assert (mixtral["num_local_experts"], mixtral["num_experts_per_tok"], mixtral["intermediate_size"]) == (4, 2, 64)
    # transformers' balance loss is top_k times moefx's: 0.01 in moefx is 0.005 in Mixtral
    assert mixtral["router_aux_loss_coef"] == 0.01 / 2 and mixtral["output_router_logits"] is False
    assert mixtral["rope_parameters"]["rope_theta"] == 5000.0  # the dense model's, not Mixtral's default
    qwen2 = loaded["qwen2-trained"]["config"]
    assert qwen2["norm_topk_prob"] is False and qwen2["moe_intermediate_size"] == 64 and qwen2["mlp_only_layers"] == []
    assert qwen2["shared_expert_intermediate_size"] == 1  # zero weights: adds exactly 0
    qwen3 = loaded["qwen3-trained"]["config"]
    assert qwen3["mlp_only_layers"] == [0] and qwen3["decoder_sparse_step"] == 1 and qwen3["head_dim"] == 16


def test_hub_names_and_one_stack_in_memory(tmp_path):
    """Mixtral's hub names (block_sparse_moe, w1 gate / w3 up / w2 down), each expert slice equal
    to its rows of the stack, and each stack made once however many slices it gives, from a model
    on the meta device and a plan of its tensors (as a streamed conversion calls it)."""
    from safetensors.torch import load_file

    from moefx.artifact.shards import planned

    ids = token_ids()
    model = moefx.moefy(dense_model("llama"), num_experts=3, top_k=2, example_inputs=(ids,))
    _perturb_experts(model)
    made = []

    def counted(name, tensor):
        entry = planned(name, tensor)
        return type(entry)(entry.name, entry.shape, entry.dtype, lambda: made.append(name) or tensor)

    plan = [counted(n, t) for n, t in model.state_dict().items()]
    write_native(copy.deepcopy(model).to("meta"), tmp_path / "out", plan=plan)  # the streaming path: structure on meta
    assert sorted(set(made)) == sorted(made)  # every tensor, expert stacks included, made once
    saved = load_file(tmp_path / "out" / "model.safetensors")
    layer = model.model.layers[1].mlp
    H = layer.config.d_hidden
    for e in range(3):
        prefix = f"model.layers.1.block_sparse_moe.experts.{e}."
        assert torch.equal(saved[prefix + "w1.weight"], layer.experts.in_proj[e, :H])
        assert torch.equal(saved[prefix + "w3.weight"], layer.experts.in_proj[e, H:])
        assert torch.equal(saved[prefix + "w2.weight"], layer.experts.out_proj[e])
    assert torch.equal(saved["model.layers.1.block_sparse_moe.gate.weight"], layer.router.weight)
    assert not any(".mlp." in name for name in saved)


def test_tokenizer_and_generation_config_are_copied(tmp_path):
    source = tmp_path / "dense"
    model = dense_model("qwen2")
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(source)
    (source / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (source / "tokenizer.json").write_text('{"version": "1.0"}\n')
    model.generation_config.max_new_tokens = 99  # the copied file wins over the model's own
    moefx.moefy(model, num_experts=2, top_k=1, example_inputs=(token_ids(),))
    out = write_native(model, tmp_path / "out", source_dir=source)
    for name in ("tokenizer_config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7


def test_force_replaces_only_an_earlier_output(tmp_path):
    model = moefx.moefy(dense_model("mistral"), num_experts=2, top_k=1, example_inputs=(token_ids(),))
    out = write_native(model, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--force"):
        write_native(model, out)
    write_native(model, out, force=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an output"):
        write_native(model, tmp_path / "other", force=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
