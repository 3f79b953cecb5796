"""A converted transformers model's own save_pretrained (and a Trainer's checkpoints) never writes
a directory that loads back dense: the native MoE family where it can express the model, else
moefx's format, which transformers refuses (naming moefx.load) and moefx.load reads back."""

import copy
import io
import json
import shutil

import pytest
import torch

import moefx
from tests.artifact.hf_native_cases import dense_model, load_without_moefx, logits, relative_error, token_ids

transformers = pytest.importorskip("transformers")
IDS = token_ids()


def _trained(model):
    """Experts made distinct, as training would: a lost or dense-initialised MLP then shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in moefx.moe_layers(model):
            layer.experts.in_proj.add_(0.05 * torch.randn(layer.experts.in_proj.shape, generator=g))
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
    return model


def test_save_pretrained_writes_the_native_family(tmp_path):
    model = _trained(moefx.moefy(dense_model("qwen3"), num_experts=4, top_k=2, example_inputs=(IDS,)))
    model.save_pretrained(tmp_path / "ck")
    assert not (tmp_path / "ck" / "moefx.json").exists()
    got = load_without_moefx({"ck": tmp_path / "ck"}, IDS, tmp_path)["ck"]
    assert got["class"] == "Qwen3MoeForCausalLM" and not got["problems"], got["problems"]
    assert relative_error(got["logits"], logits(model, IDS)) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_otherwise_a_directory_transformers_refuses_and_moefx_loads(tmp_path, family):
    if family == "gpt2":  # no native MoE family at all
        torch.manual_seed(0)
        dense = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96)).eval()
        model = moefx.moefy(dense, num_experts=4, top_k=2, example_inputs=(IDS,))
        dense_class = transformers.GPT2LMHeadModel
    else:  # a family that cannot express capacity
        model = moefx.moefy(dense_model("llama"), num_experts=4, top_k=2, capacity_factor=2.0, example_inputs=(IDS,))
        dense_class = transformers.LlamaForCausalLM
    _trained(model)
    model.save_pretrained(tmp_path / "ck")
    auto = transformers.AutoModelForCausalLM.from_pretrained
    for loader in (dense_class.from_pretrained, auto, lambda d: dense_class.from_pretrained(d, dtype=torch.float32),
                   lambda d: auto(d, dtype=torch.float32), lambda d: auto(d, dtype="float32"),
                   lambda d: auto(d, dtype=torch.bfloat16), lambda d: auto(d, dtype="auto")):
        with pytest.raises(Exception, match=r"moefx checkpoint.*load it with moefx\.load\("):
            loader(tmp_path / "ck")
    shutil.move(tmp_path / "ck", tmp_path / "moved")  # the directory is self-contained
    back = moefx.load(tmp_path / "moved")
    assert type(back).__name__ == dense_class.__name__ and isinstance(back, dense_class)
    assert torch.equal(logits(back, IDS), logits(model, IDS))
    back.save_pretrained(tmp_path / "again")  # a loaded model saves the same way
    assert torch.equal(logits(moefx.load(tmp_path / "again"), IDS), logits(model, IDS))


def test_saving_again_replaces_the_weights_and_keeps_other_files(tmp_path):
    target = tmp_path / "ck"
    refusing = moefx.moefy(dense_model("llama"), num_experts=2, top_k=1, capacity_factor=2.0, example_inputs=(IDS,))
    refusing.save_pretrained(target, max_shard_size="20KB")
    assert (target / "moefx.json").exists()
    (target / "trainer_state.json").write_text("{}")
    native = _trained(moefx.moefy(dense_model("llama"), num_experts=2, top_k=1, example_inputs=(IDS,)))
    native.save_pretrained(target)
    names = sorted(p.name for p in target.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "trainer_state.json"], names
    loaded = transformers.AutoModelForCausalLM.from_pretrained(target)
    assert type(loaded).__name__ == "MixtralForCausalLM"
    assert relative_error(logits(loaded, IDS), logits(native, IDS)) <= 1e-5


def test_trainer_checkpoints_are_native(tmp_path):
    pytest.importorskip("accelerate")
    model = moefx.moefy(dense_model("mistral"), num_experts=4, top_k=2, example_inputs=(IDS,))
    rows = [{"input_ids": row, "labels": row} for row in token_ids(seed=7, batch=8, length=8).tolist()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1)
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    assert relative_error(logits(loaded, IDS), logits(model.eval(), IDS)) <= 1e-5


def test_the_method_is_the_objects_alone(tmp_path):
    model = moefx.moefy(dense_model("llama"), num_experts=2, top_k=1, example_inputs=(IDS,))
    assert isinstance(model, transformers.LlamaForCausalLM) and type(model).__name__ == "LlamaForCausalLM"
    assert transformers.LlamaForCausalLM.save_pretrained is transformers.PreTrainedModel.save_pretrained
    assert type(dense_model("llama")).save_pretrained is transformers.PreTrainedModel.save_pretrained
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):  # our own pickle, just written
        assert type(twin).save_pretrained is type(model).save_pretrained and isinstance(twin, transformers.LlamaForCausalLM)
        assert torch.equal(logits(twin, IDS), logits(model, IDS))
    model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank").exists()


@pytest.mark.parametrize("family", ["qwen2", "granite"])
def test_load_state_dict_reads_the_native_names_back_shard_by_shard(tmp_path, family):
    """What a Trainer does on resume: each file of the native checkpoint into a converted model."""
    from safetensors.torch import load_file

    model = _trained(moefx.moefy(dense_model(family), num_experts=4, top_k=2, example_inputs=(IDS,)))
    model.save_pretrained(tmp_path / "ck", max_shard_size="30KB")
    files = sorted((tmp_path / "ck").glob("model-*.safetensors"))
    assert len(files) > 1
    fresh = moefx.moefy(dense_model(family, seed=9), num_experts=4, top_k=2, example_inputs=(IDS,))
    assert not torch.equal(logits(fresh, IDS), logits(model, IDS))
    for file in files:
        result = fresh.load_state_dict(load_file(file), strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
    assert torch.equal(logits(fresh, IDS), logits(model, IDS))
    whole = {name: t for file in files for name, t in load_file(file).items()}
    assert fresh.load_state_dict(whole).missing_keys == []  # strict: every stack filled
    whole.pop(next(name for name in whole if name.endswith("experts.3.down_proj.weight") or "output_linear" in name))
    with pytest.raises(RuntimeError, match="missing keys"):
        fresh.load_state_dict(whole)


@pytest.mark.parametrize("family", ["llama", "qwen3", "granite", "olmo2"])
def test_a_native_checkpoint_is_adopted_back_and_saves_natively_again(tmp_path, family):
    """To keep training in moefx (expert parallelism...): moefx.moefy adopts the loaded native MoE
    model (the adopt issue's work), and its save_pretrained writes the same family again."""
    model = _trained(moefx.moefy(dense_model(family), num_experts=4, top_k=2, example_inputs=(IDS,)))
    model.save_pretrained(tmp_path / "native")
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    adopted = moefx.moefy(native, example_inputs=(IDS,))
    assert len(list(moefx.moe_layers(adopted))) == 2  # at model.layers.N.mlp (GraniteMoe: .block_sparse_moe)
    assert relative_error(logits(adopted, IDS), logits(model, IDS)) <= 1e-5
    for (_, ours), (_, back) in zip(moefx.moe_layers(model), moefx.moe_layers(adopted)):
        assert back.config.load_balance_coef == pytest.approx(ours.config.load_balance_coef)  # the same loss weight
    adopted.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert type(again).__name__ == type(native).__name__
    assert relative_error(logits(again, IDS), logits(model, IDS)) <= 1e-5
