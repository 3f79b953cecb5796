"""Finding and reading a checkpoint source: directories, hub ids through the local Hugging Face cache
(a fake one, laid out as huggingface_hub lays it out), and clear errors for what is not one."""

import json
import shutil

import pytest
import torch

import moefx
from moefx.artifact.checkpoint_source import CheckpointError, is_checkpoint_source, meta_model, open_checkpoint
from moefx.converting import convert
from tests.artifact.checkpoints import in_memory, llama_config, logits, save_dense

pytest.importorskip("transformers")


def _fake_cache(cache, dense, repo="acme/tiny-llama", revision="0123456789abcdef0123456789abcdef01234567"):
    """``dense`` placed in a Hugging Face cache as a download leaves it: snapshots/<rev>/ + refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(dense, root / "snapshots" / revision)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    return root / "snapshots" / revision


def test_a_hub_id_resolves_through_the_local_cache_only(tmp_path, monkeypatch):
    dense = save_dense(tmp_path / "dense")
    snapshot = _fake_cache(tmp_path / "cache", dense)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert is_checkpoint_source("acme/tiny-llama")
    checkpoint = open_checkpoint("acme/tiny-llama")
    assert checkpoint.directory == snapshot and checkpoint.hub_id == "acme/tiny-llama"
    out = convert("acme/tiny-llama", tmp_path / "out", num_experts=4, top_k=2)
    assert json.loads((out / "moefx.json").read_text())["source"]["hub_id"] == "acme/tiny-llama"
    assert torch.equal(logits(moefx.load(out)), logits(in_memory(dense, num_experts=4, top_k=2)))


def test_a_hub_id_not_in_the_cache_is_refused_without_downloading(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"acme/absent is neither a path here nor a model in the local Hugging Face "
                                              r"cache .*moefx does not download.*hf download acme/absent"):
        open_checkpoint("acme/absent")


@pytest.mark.parametrize("make, words", [
    (lambda d: d.mkdir(), "has no config.json: pass a transformers checkpoint directory"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps(llama_config().to_dict()))),
     "has no model.safetensors or model.safetensors.index.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"), (d / "pytorch_model.bin").write_bytes(b"x")),
     "it has pytorch_model.bin: pickled weights, which moefx does not read"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{not json"), (d / "model.safetensors").write_bytes(b"")),
     "config.json is not a transformers config"),
])
def test_a_directory_that_is_not_a_checkpoint_is_refused_by_name(tmp_path, make, words):
    make(tmp_path / "bad")
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        convert(tmp_path / "bad", tmp_path / "out", num_experts=2, top_k=1)
    assert not (tmp_path / "out").exists()


def test_truncated_weights_are_refused(tmp_path):
    dense = save_dense(tmp_path / "dense")
    (dense / "model.safetensors").write_bytes((dense / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="weights of .* cannot be read"):
        open_checkpoint(dense)


def test_weights_of_another_model_are_refused_before_writing(tmp_path):
    dense = save_dense(tmp_path / "dense")
    config = llama_config()
    config.intermediate_size = 80  # the config no longer describes the saved weights
    config.save_pretrained(dense)
    with pytest.raises(CheckpointError, match="config.json describes has .* of shape .*do not belong together"):
        convert(dense, tmp_path / "out", num_experts=2, top_k=1)
    assert not (tmp_path / "out").exists()


def test_a_missing_path_that_is_no_hub_id_is_refused(tmp_path):
    assert not is_checkpoint_source(tmp_path / "absent.py")
    with pytest.raises(CheckpointError, match="not found: pass a Python model file"):
        open_checkpoint(str(tmp_path / "a b"))


def test_the_meta_model_computes_its_rotary_buffers_like_the_real_one():
    from transformers import LlamaForCausalLM

    meta = meta_model(llama_config(), torch.bfloat16)
    real = LlamaForCausalLM(llama_config())
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in meta.parameters())
    buffers = dict(real.named_buffers())
    for name, buffer in meta.named_buffers():
        assert not buffer.is_meta and torch.equal(buffer, buffers[name]), name
    assert meta.lm_head.weight is meta.model.embed_tokens.weight


def test_a_tensor_missing_from_the_files_is_refused_before_writing(tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.artifact.checkpoints import qwen2_config

    dense = save_dense(tmp_path / "dense", qwen2_config())  # untied: lm_head.weight is its own tensor
    tensors = load_file(dense / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, dense / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="the checkpoint has no tensor lm_head.weight, which the model"):
        convert(dense, tmp_path / "out", num_experts=2, top_k=1)
    assert not (tmp_path / "out").exists()
