"""``moefx convert CHECKPOINT_DIR``: a save_pretrained directory (one file or shards) through the real
command, read back by ``moefx.load`` with no model given, equal to the dense model converted in memory."""

import json
import subprocess
import sys

import pytest
import torch

import moefx
from tests.artifact.checkpoints import in_memory, logits, qwen2_config, save_dense, tokens
from tests.cli.helpers import moefx as run

pytest.importorskip("transformers")


@pytest.mark.parametrize("shards", [None, "20KB"])
def test_a_checkpoint_directory_converts_and_loads_back_equal(tmp_path, shards):
    dense = save_dense(tmp_path / "dense", max_shard_size=shards)
    assert (dense / "model.safetensors.index.json").is_file() == (shards is not None)
    result = run("convert", dense, "--experts", "4", "--init", "drop-upcycle", "-o", tmp_path / "out", "--json",
                 cwd=tmp_path)
    assert result.code == 0, result.err
    written = json.loads(result.out)
    assert written["source"]["checkpoint"] == str(dense.resolve())
    assert [layer["path"] for layer in written["moe_layers"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    loaded = moefx.load(tmp_path / "out")
    assert torch.equal(logits(loaded), logits(in_memory(dense, num_experts=4, top_k=2, init="drop-upcycle")))


def test_the_output_is_sharded_on_request_and_the_table_names_the_source(tmp_path):
    dense = save_dense(tmp_path / "dense", qwen2_config())
    result = run("convert", dense, "--experts", "2", "--top-k", "1", "--max-shard-size", "40KB", cwd=tmp_path)
    assert result.code == 0, result.err
    out = tmp_path / "dense-moefx"  # the default name: the directory's, then the format
    assert "Qwen2ForCausalLM" in result.out and str(dense) in result.out
    assert len(list(out.glob("model-0000*-of-*.safetensors"))) > 1
    assert torch.equal(logits(moefx.load(out)), logits(in_memory(dense, num_experts=2, top_k=1)))


def test_dry_run_reports_and_writes_nothing(tmp_path):
    dense = save_dense(tmp_path / "dense")
    result = run("convert", dense, "--experts", "4", "--dry-run", "--json", cwd=tmp_path)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["dry_run"] and report["convert"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert report["parameters_after"] > report["parameters_before"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


@pytest.mark.parametrize("source, words", [
    ("nothing/here", "nothing/here is neither a path here nor a model in the local Hugging Face cache"),
    ("empty", "empty has no config.json: pass a transformers checkpoint directory"),
])
def test_a_missing_or_invalid_source_is_a_usage_error(tmp_path, source, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "cache").mkdir()
    result = run("convert", source, cwd=tmp_path, env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    assert result.code == 2, result.err
    (line,) = result.err.strip().splitlines()
    assert line.startswith("moefx: error: ") and words in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "empty"]


def test_entry_is_refused_for_a_checkpoint(tmp_path):
    dense = save_dense(tmp_path / "dense")
    result = run("convert", dense, "--entry", "build", cwd=tmp_path)
    assert result.code == 2 and "--entry names a builder in a Python model file" in result.err


def test_format_hf_loads_natively_without_moefx(tmp_path):
    pytest.importorskip("moefx.artifact.hf_native")
    dense = save_dense(tmp_path / "dense")
    result = run("convert", dense, "--experts", "4", "--format", "hf", "-o", tmp_path / "native", cwd=tmp_path)
    assert result.code == 0, result.err
    torch.save(tokens(), tmp_path / "ids.pt")
    script = (  # a process that never imports moefx
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert 'moefx' not in sys.modules\n"
        "with torch.no_grad():\n    torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, tmp_path / "native", tmp_path / "ids.pt", tmp_path / "out.pt"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    native = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(native, logits(in_memory(dense, num_experts=4, top_k=2)), rtol=1e-5, atol=1e-5)
