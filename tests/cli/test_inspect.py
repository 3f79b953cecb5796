"""``moefx inspect``: the module tree with each candidate's status and the MoE layer's graph,
checked for structure, not colours."""

from __future__ import annotations

import json

import torch
from rich.console import Console

import moefx
from moefx.cli.layer_graph import layer_graph
from moefx.cli.views import Candidate, graph_table, module_tree
from tests.cli.helpers import EXAMPLES, moefx as run

MOE_OPS = [  # a gated SiLU FFN (Llama); BERT's GELU FFN runs the same without swiglu
    "moefx::route", "moefx::plan_dispatch", "moefx::gather_grouped_linear", "moefx::swiglu", "moefx::grouped_linear_combine",
]
PLAIN_MOE_OPS = [op for op in MOE_OPS if op != "moefx::swiglu"]


def _moefx_ops(ops: list[str]) -> list[str]:
    return [op for op in ops if op.startswith("moefx::")]


def test_json_lists_every_candidate_and_the_layer_graph(tmp_path):
    result = run("inspect", EXAMPLES / "tiny_llama.py", "--experts", "4", "--exclude", "*.layers.3.*", "--json", cwd=tmp_path)
    assert result.code == 0, result.err
    report = json.loads(result.out)
    status = {c["path"]: c["status"] for c in report["candidates"]}
    assert [p for p, s in status.items() if s == "converted"] == [f"model.layers.{i}.mlp" for i in range(3)]
    assert status["model.layers.3.mlp"] == "skipped"
    assert status["model.layers.0.self_attn.o_proj"] == "rejected"
    rejected = next(c for c in report["candidates"] if c["status"] == "rejected")
    assert "attention" in rejected["reason"]
    graph = report["layer"]["graph"]
    assert report["layer"]["path"] == "model.layers.0.mlp"
    assert _moefx_ops([s["op"] for s in graph]) == MOE_OPS
    by_op = {s["op"]: s for s in graph}
    assert by_op["moefx::route"]["shapes"] == ["(T, 2)", "(T, 2)", "(4,)"]
    assert by_op["moefx::plan_dispatch"]["shapes"] == ["(2*T,)", "(2*T,)", "(5,)"]
    assert by_op["moefx::gather_grouped_linear"]["shapes"] == ["(2*T, 512)"]  # gate and up: 2 x 256
    assert by_op["moefx::grouped_linear_combine"]["shapes"] == ["(T, 128)"]
    assert by_op["moefx::swiglu"]["shapes"] == ["(2*T, 256)"]


def test_terminal_view_of_a_converted_output(tmp_path):
    assert run("convert", EXAMPLES / "tiny_bert.py", "--experts", "4", "-o", "out", cwd=tmp_path).code == 0
    result = run("inspect", "out", cwd=tmp_path)
    assert result.code == 0, result.err
    assert "\x1b[" not in result.out, "not a terminal: the output must be plain"
    lines = result.out.splitlines()
    intermediate = next(line for line in lines if "intermediate" in line)
    assert "MoE(experts=4, top_k=2" in intermediate and "converted" in intermediate
    assert any("Folded" in line and "encoder.layer.0.intermediate" in line for line in lines)
    assert any("rejected" in line and "attention" in line for line in lines)
    table = lines[next(i for i, line in enumerate(lines) if "MoE layer encoder.layer.0.intermediate" in line):]
    seen = [op for op in PLAIN_MOE_OPS if any(op in line for line in table)]
    assert seen == PLAIN_MOE_OPS
    assert [table.index(next(line for line in table if op in line)) for op in PLAIN_MOE_OPS] == sorted(
        table.index(next(line for line in table if op in line)) for op in PLAIN_MOE_OPS
    ), "the ops are not listed in execution order"
    refused = run("inspect", "out", "--experts", "8", "--exclude", "*.0.*", cwd=tmp_path)  # 8: the default, typed
    assert refused.code == 2 and "--experts --exclude cannot change out" in refused.err, refused.err


def test_no_color_on_a_terminal_is_plain(tmp_path):
    coloured = run("inspect", EXAMPLES / "hand_written.py", cwd=tmp_path, env={"FORCE_COLOR": "1"})
    plain = run("inspect", EXAMPLES / "hand_written.py", cwd=tmp_path, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert coloured.code == plain.code == 0
    assert "\x1b[" in coloured.out  # the control: a terminal gets styles
    assert "\x1b[" not in plain.out and "converted" in plain.out


def test_recorded_console_tree_and_graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8), torch.nn.Linear(8, 3))
    wrapper = torch.nn.Sequential(model)
    moefx.moefy(wrapper, num_experts=2, top_k=1, example_inputs=(torch.randn(4, 8),))
    console = Console(record=True, width=200, color_system=None)
    found = [Candidate("0.0", "converted", detail="mlp 8→32 (gelu, fold)"), Candidate("0.3", "rejected", reason="d→h→d'")]
    console.print(module_tree(wrapper, found))
    (path, layer), = moefx.moe_layers(wrapper)
    console.print(graph_table(path, layer_graph(layer)))
    text = console.export_text()
    assert "0 Sequential" in text and "0 MoE(experts=2, top_k=1, d_hidden=32" in text and "converted: mlp 8→32" in text
    assert "3 Linear  rejected: d→h→d'" in text
    assert "2 Folded (computed by 0.0)" in text
    assert "moefx::route" in text and "(T, 1)" in text and "moefx::grouped_linear_combine" in text
