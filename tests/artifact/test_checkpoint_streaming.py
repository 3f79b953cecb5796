"""A checkpoint converted streamed (``moefx.convert``: on meta, one tensor or MoE layer at a time) writes
exactly the tensors of the same dense model converted in memory (``moefx.moefy``), and
``moefx.load`` rebuilds it from the manifest alone."""

import json

import pytest
import torch
from safetensors.torch import load_file

import moefx
from moefx.artifact.checkpoint_source import CheckpointError
from moefx.artifact.format import tensor_specs
from moefx.artifact.shards import parse_size
from moefx.converting import convert
from moefx.model import named_tensors
from tests.artifact.checkpoints import in_memory, llama_config, logits, qwen2_config, save_dense

pytest.importorskip("transformers")

OPTIONS = {
    "upcycle": dict(num_experts=4, top_k=2),
    "drop-upcycle": dict(num_experts=4, top_k=2, init="drop-upcycle", drop_fraction=0.5, seed=3),
    "split-kmeans": dict(num_experts=4, top_k=2, init="split", split_by="kmeans"),
    "split-contiguous-all": dict(num_experts=4, top_k=4, init="split"),
    "sigmoid": dict(num_experts=4, top_k=2, gate="sigmoid", expert_groups=2, topk_groups=1),
}


def _written(out):
    return {name: t for spec_file in sorted({s.file for s in tensor_specs(out).values()}) for name, t in load_file(spec_file).items()}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_streamed_tensors_equal_the_in_memory_conversion(tmp_path, case):
    dense = save_dense(tmp_path / "dense")
    out = convert(dense, tmp_path / "out", **OPTIONS[case])
    reference = in_memory(dense, **OPTIONS[case])
    expected = {name: t.detach() for name, t in named_tensors(reference)}
    written = _written(out)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name


def test_sharded_untied_checkpoint_in_bf16_streams_equal_and_loads(tmp_path):
    dense = save_dense(tmp_path / "dense", qwen2_config(), max_shard_size="30KB", dtype=torch.bfloat16)
    assert len(json.loads((dense / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    out = convert(dense, tmp_path / "out", num_experts=3, top_k=2, max_shard_size="30KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    reference = in_memory(dense, num_experts=3, top_k=2)
    written = _written(out)
    assert all(torch.equal(written[n], t.detach()) for n, t in named_tensors(reference))
    assert written["lm_head.weight"].dtype == torch.bfloat16
    loaded = moefx.load(out)  # rebuilt from the manifest: no model, no model file
    assert torch.equal(logits(loaded), logits(reference))


def test_load_rebuilds_from_the_manifest_and_matches_the_dense_model(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = save_dense(tmp_path / "dense", llama_config(tied=True))
    out = convert(dense, tmp_path / "out", num_experts=4, top_k=2)
    source = json.loads((out / "moefx.json").read_text())["source"]
    assert source["checkpoint"] == str(dense.resolve()) and source["architecture"] == "LlamaForCausalLM"
    loaded = moefx.load(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    original = AutoModelForCausalLM.from_pretrained(dense).eval()
    torch.testing.assert_close(logits(loaded), logits(original), rtol=1e-5, atol=1e-5)  # upcycle: the dense output


def test_the_seed_changes_only_the_random_parts(tmp_path):
    dense = save_dense(tmp_path / "dense")
    a = _written(convert(dense, tmp_path / "a", num_experts=4, top_k=2, seed=0))
    b = _written(convert(dense, tmp_path / "b", num_experts=4, top_k=2, seed=1))
    differ = {n for n in a if not torch.equal(a[n], b[n])}
    assert differ == {n for n in a if n.endswith("router.weight")}


def test_a_model_file_converts_through_the_same_function(tmp_path):
    (tmp_path / "model.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def build_model():\n    torch.manual_seed(0)\n    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))\n"
        "def example_inputs():\n    return (torch.randn(3, 8),)\n")
    out = convert(tmp_path / "model.py", tmp_path / "out", num_experts=2, top_k=2)
    x = torch.randn(5, 8)
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    torch.testing.assert_close(moefx.load(out)(x), dense(x), rtol=1e-5, atol=1e-6)


def test_kmeans_router_init_is_refused_before_anything_is_written(tmp_path):
    dense = save_dense(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="router_init='kmeans'.*streamed"):
        convert(dense, tmp_path / "out", num_experts=4, top_k=2, router_init="kmeans")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1.5kb", 1500), (123, 123), (None, None)])
def test_shard_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["5 parsecs", "0GB", -3, "GB"])
def test_a_bad_shard_size_is_refused(bad):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(bad)


def test_each_moe_layer_is_built_once_from_its_ffn_alone(tmp_path, monkeypatch):
    import moefx.artifact.streaming as streaming

    dense = save_dense(tmp_path / "dense", qwen2_config())
    built, real = [], streaming.layer_for

    def counting(model, match, **options):
        ffn = {n for n in (match.up, match.gate, match.down) if n}
        held = {n for n, p in model.named_parameters() if not p.is_meta}
        assert held == ffn, f"{match.path}: real tensors {held - ffn} besides the FFN's"  # only that FFN is read
        built.append(match.path)
        return real(model, match, **options)

    monkeypatch.setattr(streaming, "layer_for", counting)
    convert(dense, tmp_path / "out", num_experts=2, top_k=1, gate="sigmoid", bias_update_rate=0.01)  # a buffer per layer
    assert built == ["model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_a_bad_seed_is_refused_before_any_work(tmp_path, seed):
    with pytest.raises(ValueError, match="seed=.* is invalid: it must be an integer >= 0"):
        convert(tmp_path / "absent", tmp_path / "out", num_experts=2, top_k=1, seed=seed)
