"""``moefx export`` and ``moefx.export``: the exported program and the AOTInductor package give the
converted model's outputs (the package run in a fresh process), the moefx ops stay single nodes,
and every refusal is one line that leaves nothing behind."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import moefx
from moefx.lowering import ExportError
from tests.cli.helpers import EXAMPLES, ROOT, moefx as run

MOEFX_OPS = {"route", "plan_dispatch", "gather_grouped_linear", "grouped_linear_combine"}  # a local layer runs the fused ops
HAS_TENSORRT = torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt") is not None


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """tiny_gpt2 converted by the command, with its example inputs and the loaded model's hidden states."""
    cwd = tmp_path_factory.mktemp("export")
    assert run("convert", EXAMPLES / "tiny_gpt2.py", "--experts", "4", "-o", "out", cwd=cwd).code == 0
    sys.path.insert(0, str(EXAMPLES))
    try:
        from tiny_gpt2 import example_inputs
    finally:
        sys.path.remove(str(EXAMPLES))
    inputs = example_inputs()
    with torch.no_grad():
        want = moefx.load(cwd / "out").eval()(*inputs).last_hidden_state
    return cwd, inputs, want


def test_pt2_export_round_trips_with_the_moefx_ops_as_nodes(converted):
    cwd, inputs, want = converted
    done = run("export", "out", "--json", cwd=cwd)
    assert done.code == 0, done.err
    report = json.loads(done.out)
    assert report["format"] == "pt2" and report["output"] == str(cwd / "out" / "model.pt2")
    program = torch.export.load(cwd / "out" / "model.pt2")
    ops = [n.target for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("moefx.")]
    assert {str(op).split(".")[1] for op in ops} == MOEFX_OPS
    assert len(ops) == 3 * len(MOEFX_OPS)  # 3 MoE layers, each op once
    torch.testing.assert_close(program.module()(*inputs).last_hidden_state, want, rtol=1e-6, atol=1e-6)


def test_aoti_package_runs_in_a_fresh_process(converted, tmp_path):
    cwd, inputs, want = converted
    done = run("export", "out", "--format", "aoti", "-o", tmp_path / "gpt2.pt2", cwd=cwd, timeout=600)
    assert done.code == 0, done.err
    assert "moefx export" in done.out and "aoti_load_package" in done.out
    torch.save({"inputs": inputs, "want": want}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, moefx  # moefx registers the ops the package calls
        import transformers.modeling_outputs  # registers the output type the package returns
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        runner = torch._inductor.aoti_load_package({str(tmp_path / 'gpt2.pt2')!r})
        got = runner(*io["inputs"]).last_hidden_state
        print(float((got - io["want"]).abs().max() / io["want"].abs().max()))
    """)
    ran = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert float(ran.stdout.strip().splitlines()[-1]) <= 1e-5  # Inductor fuses the dense parts, so not bit-equal


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["export", "nowhere"], 2, "nowhere is not a directory: pass the output of moefx convert"),
        (["export", "out", "--format", "onnx"], 2, "--format 'onnx' is unknown: choose one of pt2, aoti, tensorrt"),
        (["export", "out", "--format", "aoti", "-o", "x.so"], 2, "an AOTInductor package must be named *.pt2"),
        (["export", "out", "-o", "no/dir/x.pt2"], 2, "the directory no/dir does not exist; create it first"),
        pytest.param(["export", "out", "--device", "cuda"], 2, "sees no CUDA GPU; use --device cpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is there to export for")),
    ],
)
def test_usage_errors(converted, argv, code, message):
    cwd = converted[0]
    before = sorted(p.name for p in cwd.rglob("*"))
    done = run(*argv, cwd=cwd)
    assert done.code == code and message in done.err and len(done.err.strip().splitlines()) == 1
    assert sorted(p.name for p in cwd.rglob("*")) == before


def test_an_existing_file_needs_force(converted):
    cwd = converted[0]
    (cwd / "taken.pt2").write_text("mine")
    done = run("export", "out", "-o", "taken.pt2", cwd=cwd)
    assert done.code == 2 and "taken.pt2 exists: pass --force" in done.err
    assert (cwd / "taken.pt2").read_text() == "mine"
    assert run("export", "out", "-o", "taken.pt2", "--force", cwd=cwd).code == 0
    assert torch.export.load(cwd / "taken.pt2") is not None


@pytest.mark.skipif(HAS_TENSORRT, reason="torch_tensorrt is installed with a GPU: the real export runs in the test below")
def test_tensorrt_without_torch_tensorrt_is_one_clear_line(converted):
    cwd = converted[0]
    done = run("export", "out", "--format", "tensorrt", cwd=cwd)
    assert done.code == 1 and "needs torch_tensorrt" in done.err and len(done.err.strip().splitlines()) == 1
    assert not (cwd / "out" / "model.trt.pt2").exists()


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs torch_tensorrt and a CUDA GPU")
def test_tensorrt_export_matches_the_model(converted):
    cwd, inputs, want = converted
    done = run("export", "out", "--format", "tensorrt", "--device", "cuda", cwd=cwd, timeout=900)
    assert done.code == 0, done.err
    got = torch.export.load(cwd / "out" / "model.trt.pt2").module()(*(t.cuda() for t in inputs)).last_hidden_state
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)  # TensorRT picks its own kernels


def test_the_python_api_refuses_offloaded_models_and_unknown_formats(converted, tmp_path):
    cwd, inputs, _ = converted
    model = moefx.load(cwd / "out")
    with pytest.raises(ValueError, match="format='onnx' is unknown"):
        moefx.export(model, tmp_path / "m.pt2", example_inputs=inputs, format="onnx")
    moefx.offload(model, device="cpu", budget_bytes=1 << 30)
    with pytest.raises(ExportError, match="export it before moefx.offload"):
        moefx.export(model, tmp_path / "m.pt2", example_inputs=inputs)
    assert list(tmp_path.iterdir()) == []


def test_an_output_holding_a_kv_cache_is_refused_with_the_fix(tmp_path):
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 50, (2, 6))
    moefx.moefy(model, 4, 2, example_inputs=(ids,))  # capture itself copes with the cache in the output
    with pytest.raises(ExportError, match=r"holds DynamicCache.*use_cache=False"):
        moefx.export(model, tmp_path / "m.pt2", example_inputs=(ids,))
    assert list(tmp_path.iterdir()) == []
    path = moefx.export(model, tmp_path / "m.pt2", example_inputs=(ids,), example_kwargs={"use_cache": False})
    with torch.no_grad():
        got = torch.export.load(path).module()(ids, use_cache=False).last_hidden_state
        torch.testing.assert_close(got, model(ids, use_cache=False).last_hidden_state, rtol=1e-6, atol=1e-6)
