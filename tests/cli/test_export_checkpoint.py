"""``moefx export`` of an output converted from a transformers checkpoint directory (no model file):
``--format pt2`` rebuilds the model from the config the manifest records and gives the dense
model's logits for any batch and length; ``--format hf`` carries the checkpoint's tokenizer, and
the result loads (tokenizer and model) in a process that never imports moefx."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import moefx
from tests.artifact.checkpoints import VOCAB, logits, save_dense
from tests.cli.helpers import moefx as run

pytest.importorskip("transformers")

WORDS = ["[UNK]", "[PAD]", "the", "experts", "route", "tokens", "to", "a", "few", "of", "many"]
TEXT = "the experts route tokens to a few of the many experts"

LOADER = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
hf, out = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(hf)
ids = tokenizer(sys.argv[3], return_tensors="pt").input_ids
with torch.no_grad():
    logits = AutoModelForCausalLM.from_pretrained(hf).eval()(ids).logits
assert not any(name.split(".")[0] == "moefx" for name in sys.modules), "moefx was imported"
torch.save({"ids": ids, "logits": logits}, out)
"""


def _save_tokenizer(directory):
    """A word-level tokenizer over ``WORDS``, saved beside the dense checkpoint as save_pretrained does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("export-checkpoint")
    save_dense(cwd / "dense")
    tokenizer = _save_tokenizer(cwd / "dense")
    done = run("convert", "dense", "--experts", "4", "-o", "out", cwd=cwd)
    assert done.code == 0, done.err
    return cwd, tokenizer


def test_pt2_export_of_a_checkpoint_output_gives_the_dense_logits_for_any_batch_and_length(converted):
    from transformers import AutoModelForCausalLM

    cwd, _ = converted
    done = run("export", "out", "--format", "pt2", "--json", cwd=cwd)
    assert done.code == 0, done.err
    report = json.loads(done.out)
    assert report["warnings"] == [], report["warnings"]  # batch and sequence stay dynamic
    program = torch.export.load(cwd / "out" / "model.pt2").module()
    dense = AutoModelForCausalLM.from_pretrained(cwd / "dense").eval()  # upcycled: the dense model's outputs
    for batch, length in [(2, 16), (3, 7), (1, 21)]:
        ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            got = program(ids)["logits"]
        torch.testing.assert_close(got, logits(dense, ids), rtol=1e-4, atol=1e-5)


def test_hf_export_copies_the_checkpoint_tokenizer_and_loads_without_moefx(converted, tmp_path):
    cwd, tokenizer = converted
    done = run("export", "out", "--format", "hf", "-o", "hf", cwd=cwd)
    assert done.code == 0, done.err
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (cwd / "hf" / name).read_bytes() == (cwd / "dense" / name).read_bytes(), name
    result = tmp_path / "loaded.pt"
    loaded = subprocess.run([sys.executable, "-c", LOADER, str(cwd / "hf"), str(result), TEXT], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    got = torch.load(result, weights_only=True)
    want_ids = torch.tensor([[WORDS.index(w) for w in TEXT.split()]])
    assert torch.equal(got["ids"], want_ids) and torch.equal(tokenizer(TEXT, return_tensors="pt").input_ids, want_ids)
    torch.testing.assert_close(got["logits"], logits(moefx.load(cwd / "out"), want_ids), rtol=1e-5, atol=1e-6)


def test_inspect_of_a_checkpoint_output_reports_its_converted_layers(converted):
    cwd, _ = converted
    done = run("inspect", "out", "--json", cwd=cwd)
    assert done.code == 0, done.err
    summary = json.loads(done.out)["summary"]
    assert summary["model"] == "LlamaForCausalLM" and summary["options"]["num_experts"] == 4
    assert summary["ffns"]["found"] == summary["ffns"]["converted"] == 2  # save_dense's two decoder layers
