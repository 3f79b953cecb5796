"""``moefx export OUT_DIR --format hf``: a moefx output (after training, say) as the native MoE
family, loaded by transformers in a process that never imports moefx with the converted model's
logits and greedy tokens; what the family cannot express is one line that writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

import moefx
from tests.artifact.hf_native_cases import load_without_moefx, logits, relative_error
from tests.cli.helpers import moefx as run
from tests.cli.helpers import write_model_file

pytest.importorskip("transformers")

LLAMA = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def build_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()

def example_inputs():
    return (torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(1)),)
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("export-hf")
    write_model_file(cwd, LLAMA, "llama.py")
    done = run("convert", "llama.py", "--experts", "4", "--init", "drop-upcycle", "-o", "out", cwd=cwd)
    assert done.code == 0, done.err
    return cwd


def test_export_hf_loads_natively_with_the_same_outputs(converted, tmp_path):
    done = run("export", "out", "--format", "hf", "--max-shard-size", "40KB", "--json", cwd=converted)
    assert done.code == 0, done.err
    report = json.loads(done.out)
    target = converted / "out" / "hf"
    assert report["output"] == str(target) and report["architecture"] == "MixtralForCausalLM"
    assert len(list(target.glob("model-*-of-*.safetensors"))) > 1 and (target / "model.safetensors.index.json").exists()
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    got = load_without_moefx({"hf": target}, ids, tmp_path)["hf"]
    assert got["class"] == "MixtralForCausalLM" and not got["problems"], got["problems"]
    model = moefx.load(converted / "out")
    assert relative_error(got["logits"], logits(model, ids)) <= 1e-5
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got["tokens"], tokens)
    again = run("export", "out", "--format", "hf", cwd=converted)
    assert again.code == 2 and "--force" in again.err


def test_what_mixtral_cannot_express_is_refused_in_one_line(tmp_path):
    write_model_file(tmp_path, LLAMA, "llama.py")
    assert run("convert", "llama.py", "--experts", "4", "--capacity-factor", "1.5", "-o", "out", cwd=tmp_path).code == 0
    done = run("export", "out", "--format", "hf", cwd=tmp_path)
    assert done.code == 1 and len(done.err.strip().splitlines()) == 1, done.err
    assert "capacity_factor=1.5" in done.err and "--format moefx" in done.err
    assert not (tmp_path / "out" / "hf").exists() and not list((tmp_path / "out").glob(".hf*"))


def test_shard_size_is_checked(converted):
    done = run("export", "out", "--format", "hf", "--max-shard-size", "lots", "-o", "elsewhere", cwd=converted)
    assert done.code == 2 and "max_shard_size='lots' is not a size" in done.err
    done = run("export", "out", "--max-shard-size", "5GB", cwd=converted)
    assert done.code == 2 and "--max-shard-size is for --format hf" in done.err
    assert not (converted / "elsewhere").exists()
