"""``moefx convert`` end to end on the bundled examples, and ``moefx.load`` of what it wrote."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors import safe_open

import moefx
from moefx.artifact.model_file import load_model_file
from moefx.passes.driver import conversion_options, convert_found, search
from tests.cli.helpers import EXAMPLES, MLP_MODEL, write_model_file
from tests.cli.helpers import moefx as run

# example: (FFNs in the model, options)
EXAMPLE_FILES = {
    "tiny_llama": (4, ["--experts", "4", "--top-k", "2"]),
    "tiny_gpt2": (3, ["--experts", "4", "--init", "drop-upcycle"]),
    "tiny_bert": (2, ["--experts", "4", "--init", "split", "--top-k", "4"]),
    "tiny_vit": (2, ["--experts", "2", "--top-k", "1", "--gate", "switch", "--capacity-factor", "1.5"]),
    "hand_written": (3, ["--experts", "4", "--top-k", "1", "--every", "2"]),
}


def _output(result):
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else getattr(result, "logits", result)


def _converted_in_memory(name: str, args: list[str]):
    """What the command does, done here with the same options, for comparison."""
    built = load_model_file(EXAMPLES / f"{name}.py")
    flags = dict(zip(args[::2], args[1::2]))
    options = conversion_options(
        num_experts=int(flags["--experts"]), top_k=int(flags.get("--top-k", 2)), init=flags.get("--init", "upcycle"),
        gate=flags.get("--gate", "topk"), capacity_factor=float(flags["--capacity-factor"]) if "--capacity-factor" in flags else None,
        every=int(flags.get("--every", 1)),
    )
    found = search(built.model, built.example_args, built.example_kwargs)
    convert_found(built.model, found, options, example_inputs=built.example_args, example_kwargs=built.example_kwargs)
    return built


@pytest.mark.parametrize("name", list(EXAMPLE_FILES))
def test_convert_then_load_equals_the_model_converted_in_memory(tmp_path, name):
    ffns, args = EXAMPLE_FILES[name]
    result = run("convert", EXAMPLES / f"{name}.py", *args, "-o", "out", cwd=tmp_path)
    assert result.code == 0, result.err
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "moefx.json"]
    manifest = json.loads((out / "moefx.json").read_text())
    (conversion,) = manifest["conversions"]
    converted = conversion["converted"]
    every = int(dict(zip(args[::2], args[1::2])).get("--every", 1))
    assert len(converted) == ffns // every and len(converted) + len(conversion["skipped"]) == ffns
    assert all(c["d_model"] > 0 and c["d_hidden"] > 0 and c["kind"] in ("mlp", "glu") for c in converted)
    params, layer = manifest["parameters"], manifest["moe_layers"][0]
    assert (params["active_per_token"] < params["total"]) == (layer["top_k"] < layer["num_experts"])
    assert manifest["source"]["entry"] == "build_model" and manifest["torch_version"] in torch.__version__
    assert "FFNs found" in result.out and str(out) in result.out

    expected = _converted_in_memory(name, args)
    loaded = moefx.load(out)
    assert [p for p, _ in moefx.moe_layers(loaded)] == [c["path"] for c in converted]
    expected_state, loaded_state = expected.model.state_dict(), loaded.state_dict()
    assert expected_state.keys() == loaded_state.keys()
    for key in expected_state:
        torch.testing.assert_close(loaded_state[key], expected_state[key], rtol=0, atol=0, msg=key)
    expected.model.eval(), loaded.eval()
    args = expected.example_args or (torch.randint(0, 256, (2, 12)),)  # hand_written defines none
    with torch.no_grad():
        want = _output(expected.model(*args, **(expected.example_kwargs or {})))
        got = _output(loaded(*args, **(expected.example_kwargs or {})))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dry_run_writes_nothing_and_lists_what_would_convert(tmp_path):
    result = run("convert", EXAMPLES / "hand_written.py", "--dry-run", "--exclude", "blocks.1.*", "--json", cwd=tmp_path)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["dry_run"] and report["convert"] == ["blocks.0.ffn", "blocks.2.ffn"]
    assert [s["path"] for s in report["skipped"]] == ["blocks.1.ffn"]
    assert list(tmp_path.iterdir()) == []


def test_json_output_is_the_manifest(tmp_path):
    result = run("convert", EXAMPLES / "hand_written.py", "--experts", "4", "--json", cwd=tmp_path)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["output"] == str(tmp_path / "hand_written-moefx")
    assert report["conversions"][0]["options"]["num_experts"] == 4
    assert json.loads((tmp_path / "hand_written-moefx" / "moefx.json").read_text())["moe_layers"] == report["moe_layers"]


def test_force_replaces_an_existing_output(tmp_path):
    write_model_file(tmp_path, MLP_MODEL)
    assert run("convert", "model.py", "-o", "out", "--experts", "2", cwd=tmp_path).code == 0
    (tmp_path / "out" / "stale.txt").write_text("old")
    result = run("convert", "model.py", "-o", "out", "--experts", "4", "--force", cwd=tmp_path)
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "moefx.json"]
    assert json.loads((tmp_path / "out" / "moefx.json").read_text())["moe_layers"][0]["num_experts"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py", "out"], "temporary directories were left"


def test_dtype_casts_the_written_weights(tmp_path):
    result = run("convert", EXAMPLES / "hand_written.py", "--dtype", "bfloat16", "-o", "out", cwd=tmp_path)
    assert result.code == 0, result.err
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("blocks.0.ffn.experts.in_proj").dtype == torch.bfloat16
    loaded = moefx.load(tmp_path / "out")
    assert loaded.blocks[0].ffn.experts.in_proj.dtype == torch.bfloat16


def test_bench_runs_the_layer_benchmark(tmp_path):
    result = run(
        "bench", "--tokens", "64", "--d", "16", "--h", "32", "--experts", "4", "--top-k", "2",
        "--impls", "moefx", "moefx_permuted", "moefx_ref", "dense", "--repeats", "1", "--warmup", "0", cwd=tmp_path,
    )
    assert result.code == 0, result.err
    rows = {line.split()[1]: line for line in result.out.splitlines() if line.startswith("custom ")}
    assert "T=64 d=16 h=32 E=4 k=2" in result.out and set(rows) == {"moefx", "moefx_permuted", "moefx_ref", "dense"}
    assert "skipped: on CPU the default ops are moefx's kernels" in rows["moefx_ref"]
    assert "skipped" not in rows["moefx_permuted"]


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_while_writing_leaves_no_output_and_keeps_the_old_one(tmp_path, monkeypatch, capsys, existing):
    from moefx.artifact import save as artifact
    from moefx.cli.main import main

    def interrupted_save_file(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "save_file", interrupted_save_file)
    root, torch_logger = logging.getLogger(), logging.getLogger("torch")  # main() sets up the process's logging
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(torch_logger, "level", torch_logger.level)
    model_py = write_model_file(tmp_path, MLP_MODEL)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "moefx.json").write_text("old")
    code = main(["convert", str(model_py), "-o", str(out), *(["--force"] if existing else [])])
    assert code == 130
    assert capsys.readouterr().err.strip() == "moefx: error: interrupted; nothing written"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model.py", "out"] if existing else ["model.py"])
    if existing:
        assert [p.name for p in out.iterdir()] == ["moefx.json"] and (out / "moefx.json").read_text() == "old"


def test_sigmoid_gate_options_reach_every_layer(tmp_path):
    flags = ["--experts", "8", "--gate", "sigmoid", "--expert-groups", "4", "--topk-groups", "2",
             "--bias-update-rate", "0.001"]
    result = run("convert", EXAMPLES / "tiny_llama.py", *flags, "-o", "out", cwd=tmp_path)
    assert result.code == 0, result.err
    layers = list(moefx.moe_layers(moefx.load(tmp_path / "out")))
    assert len(layers) == 4
    for _, layer in layers:
        c = layer.config
        assert (c.gate, c.expert_groups, c.topk_groups, c.bias_update_rate) == ("sigmoid", 4, 2, 0.001)
    bad = run("convert", EXAMPLES / "tiny_llama.py", "--experts", "8", "--expert-groups", "2", "-o", "bad", cwd=tmp_path)
    assert bad.code == 2 and "expert_groups=2" in bad.err and "needs gate='sigmoid'" in bad.err, bad.err
    assert not (tmp_path / "bad").exists()


def test_load_without_the_dense_model_keeps_tied_weights_tied(tmp_path):
    """``moefx.load(dir)`` builds the model from its file and moves it to meta before reading the
    weights: the tied LM head (saved once) must stay tied through that move."""
    write_model_file(tmp_path, """
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        def build_model():
            torch.manual_seed(0)
            return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                              use_cache=False, tie_word_embeddings=True))

        def example_inputs():
            return (torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)),)
    """)
    assert run("convert", "model.py", "--experts", "2", "-o", "out", cwd=tmp_path).code == 0
    loaded = moefx.load(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert not loaded.lm_head.weight.is_meta
    inspected = run("inspect", "out", cwd=tmp_path)
    assert inspected.code == 0, inspected.err


TWO_FFN_SIZES = """
import torch
from torch import nn

class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        self.narrow = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    def forward(self, x):
        return self.narrow(self.wide(x))

def build_model():
    return Two()

def example_inputs():
    return (torch.randn(3, 8),)
"""


def test_summary_gives_the_expert_size_of_each_layer_size(tmp_path):
    """Upcycled experts are copies of their dense FFN: one expert has that FFN's parameter count."""
    write_model_file(tmp_path, TWO_FFN_SIZES)
    dense = load_model_file(tmp_path / "model.py").model
    narrow, wide = (sum(p.numel() for p in ffn.parameters()) for ffn in (dense.narrow, dense.wide))
    result = run("convert", "model.py", "--experts", "2", cwd=tmp_path, env={"COLUMNS": "200"})
    assert result.code == 0, result.err
    assert re.search(rf"expert size\s+│ {narrow} to {wide} parameters, by layer", result.out), result.out


def test_dry_run_gives_the_parameters_after_conversion_and_writes_nothing(tmp_path):
    """The dry run converts a meta-device copy: its counts (after, active per token, per expert)
    are those the real conversion writes in moefx.json, the table shows them, and nothing is written."""
    flags = ["--experts", "4", "--top-k", "1", "--exclude", "blocks.1.*"]
    dry = run("convert", EXAMPLES / "hand_written.py", *flags, "--dry-run", "--json", cwd=tmp_path)
    assert dry.code == 0, dry.err
    table = run("convert", EXAMPLES / "hand_written.py", *flags, "--dry-run", cwd=tmp_path)
    assert table.code == 0, table.err
    assert list(tmp_path.iterdir()) == []
    report = json.loads(dry.out)
    real = run("convert", EXAMPLES / "hand_written.py", *flags, "-o", "out", "--json", cwd=tmp_path)
    assert real.code == 0, real.err
    written = json.loads(real.out)["parameters"]
    assert report["convert"] == ["blocks.0.ffn", "blocks.2.ffn"]
    assert (report["parameters_after"], report["active_per_token"], report["per_expert"]) == (
        written["total"], written["active_per_token"], written["per_expert"])
    assert report["parameters_before"] < report["active_per_token"] < report["parameters_after"]
    assert re.search(rf"parameters\s+│ .*\({report['parameters_before']:,}\) → .*\({written['total']:,}\)", table.out), table.out
    assert re.search(rf"active per token\s+│ .*\({written['active_per_token']:,}\)", table.out), table.out
    assert "dry run: nothing written" in table.out
