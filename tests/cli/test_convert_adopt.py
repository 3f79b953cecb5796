"""``moefx convert`` adopts existing MoE blocks as moefy does: a model file building a tiny Mixtral and
a Mixtral checkpoint directory both become moefx outputs that ``moefx.load`` reads back with the
original model's logits; ``moefx inspect`` lists the blocks."""

from __future__ import annotations

import json

import pytest
import torch

import moefx
from moefx.layer.moe import MoE
from tests.cli.helpers import moefx as run
from tests.cli.helpers import write_model_file

pytest.importorskip("transformers")

MIXTRAL_FILE = """
import torch
import transformers

def build_model():
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)  # transformers starts routers at 0: random routing makes the check meaningful
    return model

def example_inputs():
    return (torch.arange(16).reshape(2, 8) % 64,)
"""


def _original(path):
    scope: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), scope)
    return scope["build_model"]()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _tokens():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _check_equal(got, want):
    error = float((got - want).abs().max() / want.abs().max())
    assert error <= 1e-5, error


def test_a_model_file_with_mixtral_blocks_is_adopted(tmp_path):
    file = write_model_file(tmp_path, MIXTRAL_FILE)
    result = run("convert", file, "-o", tmp_path / "out", cwd=tmp_path)
    assert result.code == 0, result.err
    assert "adopted MoE blocks" in result.out and "model.layers.0.mlp" in result.out, result.out
    loaded = moefx.load(tmp_path / "out").eval()
    layers = [name for name, m in loaded.named_modules() if isinstance(m, MoE)]
    assert layers == ["model.layers.0.mlp", "model.layers.1.mlp"]
    _check_equal(_logits(loaded, _tokens()), _logits(_original(file), _tokens()))


def test_a_mixtral_checkpoint_directory_is_adopted(tmp_path):
    file = write_model_file(tmp_path, MIXTRAL_FILE)
    original = _original(file)
    original.save_pretrained(tmp_path / "mixtral")
    result = run("convert", tmp_path / "mixtral", "-o", tmp_path / "out", cwd=tmp_path)
    assert result.code == 0, result.err
    assert "adopted MoE blocks" in result.out, result.out
    loaded = moefx.load(tmp_path / "out").eval()
    assert sum(isinstance(m, MoE) for m in loaded.modules()) == 2
    _check_equal(_logits(loaded, _tokens()), _logits(original, _tokens()))


def test_a_given_expert_count_that_contradicts_a_block_is_refused(tmp_path):
    file = write_model_file(tmp_path, MIXTRAL_FILE)
    result = run("convert", file, "--experts", "6", "-o", tmp_path / "out", cwd=tmp_path)
    assert result.code == 2, result.err
    assert "--experts 6 contradicts the existing MoE block 'model.layers.0.mlp'" in result.err, result.err
    assert not (tmp_path / "out").exists()


def test_dry_run_and_inspect_list_the_adopted_blocks(tmp_path):
    file = write_model_file(tmp_path, MIXTRAL_FILE)
    result = run("convert", file, "--dry-run", "--json", cwd=tmp_path)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["adopt"] == ["model.layers.0.mlp", "model.layers.1.mlp"] and report["convert"] == []
    shown = run("inspect", file, cwd=tmp_path)
    assert shown.code == 0, shown.err
    assert "model.layers.0.mlp" in shown.out and "adopt" in shown.out.lower(), shown.out
