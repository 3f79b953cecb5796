"""The checkpoints issue's round trip for adopted models: a transformers MoE model adopted by moefy,
trained one optimizer step in moefx, written back with save_pretrained, loads in a process that never
imports moefx as the same family with the trained model's logits."""

import json

import pytest
import torch

import moefx
from tests.artifact.hf_native_cases import load_without_moefx, logits, relative_error
from tests.passes.adopt_models import hf_model

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _adopted_and_trained(family: str):
    original = hf_model(family)
    before = logits(original, IDS)
    model = moefx.moefy(original, example_inputs=(IDS,)).train()
    assert len(list(moefx.moe_layers(model))) == 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    model.eval()
    trained = logits(model, IDS)
    assert relative_error(trained, before) > 1e-3  # the step changed the model: a stale write would show
    return model, trained


def test_adopted_mixtral_trained_one_step_round_trips_natively(tmp_path):
    model, trained = _adopted_and_trained("mixtral")
    model.save_pretrained(tmp_path / "native")
    loaded = load_without_moefx({"mixtral": tmp_path / "native"}, IDS, tmp_path)["mixtral"]
    assert loaded["class"] == "MixtralForCausalLM" and not loaded["problems"], loaded["problems"]
    assert relative_error(loaded["logits"], trained) <= 1e-5


def test_adopted_qwen2_moe_trained_one_step_round_trips_natively(tmp_path):
    """Qwen2-MoE's sigmoid-gated shared expert is written as the layer's own shared experts and gate."""
    model, trained = _adopted_and_trained("qwen2_moe")
    model.save_pretrained(tmp_path / "native")
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == 32
    loaded = load_without_moefx({"qwen2_moe": tmp_path / "native"}, IDS, tmp_path)["qwen2_moe"]
    assert loaded["class"] == "Qwen2MoeForCausalLM" and not loaded["problems"], loaded["problems"]
    assert relative_error(loaded["logits"], trained) <= 1e-5


def test_adopted_qwen2_moe_reads_its_native_checkpoint_back(tmp_path):
    """A Trainer resuming: the native names, shared expert included, loaded into another adopted model."""
    from safetensors.torch import load_file

    model, trained = _adopted_and_trained("qwen2_moe")
    model.save_pretrained(tmp_path / "native")
    fresh = moefx.moefy(hf_model("qwen2_moe"), example_inputs=(IDS,)).eval()
    assert relative_error(logits(fresh, IDS), trained) > 1e-3
    result = fresh.load_state_dict(load_file(tmp_path / "native" / "model.safetensors"))
    assert result.missing_keys == [] and not result.unexpected_keys
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_a_dense_qwen2_converted_with_a_gated_shared_expert_writes_it_natively(tmp_path):
    """The same place serves a converted dense Qwen2 whose layers got shared experts and their gate;
    without the gate Qwen2-MoE cannot express them, and the error says so."""
    from moefx.artifact.hf_native import NativeFormatError, write_native
    from tests.artifact.hf_native_cases import dense_model, token_ids

    ids = token_ids()
    options = {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "example_inputs": (ids,)}
    model = moefx.moefy(dense_model("qwen2"), shared_expert_gate=True, **options)
    with torch.no_grad():  # a gate and shared expert far from their initial values: a dropped one would show
        for _, layer in moefx.moe_layers(model):
            layer.shared_gate.weight.normal_(0.0, 1.0)
            layer.shared_experts.out_proj.weight.mul_(5.0)
    write_native(model, tmp_path / "native")
    loaded = load_without_moefx({"qwen2": tmp_path / "native"}, ids, tmp_path)["qwen2"]
    assert loaded["class"] == "Qwen2MoeForCausalLM" and not loaded["problems"], loaded["problems"]
    assert loaded["config"]["shared_expert_intermediate_size"] == loaded["config"]["moe_intermediate_size"]
    assert relative_error(loaded["logits"], logits(model, ids)) <= 1e-5
    ungated = moefx.moefy(dense_model("qwen2"), **options)
    with pytest.raises(NativeFormatError, match="shared experts without shared_expert_gate"):
        write_native(ungated, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
