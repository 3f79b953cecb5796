"""``moefx inspect``: the module tree with each candidate's status and the MoE layer's graph,
checked for structure, not colours."""

from __future__ import annotations

import json

import torch
from rich.console import Console

import moefx
from moefx.artifact.model_file import load_model_file
from moefx.cli.layer_graph import layer_graph
from moefx.cli.views import Candidate, candidates, graph_table, module_tree
from moefx.model import parameter_counts
from tests.cli.helpers import EXAMPLES, write_model_file
from tests.cli.helpers import moefx as run

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


LLAMA_24 = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def build_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=24,
                                        num_attention_heads=2, num_key_value_heads=1, use_cache=False))

def example_inputs():
    return (torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)),)
"""


def test_a_deep_model_shows_a_summary_then_its_alike_layers_once(tmp_path):
    """24 layers: the summary first, then the layers as one ``0-23 (×24)`` subtree, the whole
    view in a 50-line terminal; ``--full`` shows every layer; an output directory gives the same
    summary (its parameters before conversion recomputed from the record)."""
    write_model_file(tmp_path, LLAMA_24)
    result = run("inspect", "model.py", "--experts", "4", cwd=tmp_path)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) < 50, result.out
    assert lines[0].strip() == "moefx inspect"
    head = "\n".join(lines[:8])
    assert "LlamaForCausalLM from model.py:build_model" in head
    assert "4 experts, top-2, gate topk, init upcycle, dropless" in head
    assert "24 found, 24 converted; 24 other candidates rejected" in head
    dense = load_model_file(tmp_path / "model.py").model
    before = sum(p.numel() for p in dense.parameters())
    moefx.moefy(dense, num_experts=4, top_k=2, example_inputs=load_model_file(tmp_path / "model.py").example_args)
    after = parameter_counts(dense)
    assert f"{before:,}) before → " in head and f"({after.total:,}) after" in head, head
    assert f"({after.active_per_token:,})" in head, head
    layers = [line for line in lines if "LlamaDecoderLayer" in line]
    assert len(layers) == 1 and "0-23 (×24) LlamaDecoderLayer" in layers[0], result.out
    assert sum("converted: glu 32→64" in line for line in lines) == 1

    full = run("inspect", "model.py", "--experts", "4", "--full", cwd=tmp_path)
    assert full.code == 0, full.err
    shown = [line.split("LlamaDecoderLayer")[0].split()[-1] for line in full.out.splitlines() if "LlamaDecoderLayer" in line]
    assert shown == [str(i) for i in range(24)]
    assert sum("converted: glu 32→64" in line for line in full.out.splitlines()) == 24

    assert run("convert", "model.py", "--experts", "4", "-o", "out", cwd=tmp_path).code == 0
    saved = run("inspect", "out", "--json", cwd=tmp_path)
    assert saved.code == 0, saved.err
    summary = json.loads(saved.out)["summary"]
    assert summary["parameters"] == {"before": before, "after": after.total, "active_per_token": after.active_per_token,
                                     "per_expert": after.expert}
    assert summary["ffns"] == {"found": 24, "converted": 24, "skipped": 0, "rejected": 24}
    assert summary["source"]["kind"] == "output directory" and summary["source"]["file"] == "model.py"
    assert summary["options"]["num_experts"] == 4


def test_layers_that_differ_are_grouped_apart():
    """``--every 2``: converted and skipped layers are two groups, each with its own status; a
    path into a layer (a Folded module's) reads ``<list>.*.<rest>`` in the group."""
    class Block(torch.nn.Module):  # GPT-2's MLP: the FFN is spread over modules, next to a dropout
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)
            self.drop = torch.nn.Dropout(0.1)

        def forward(self, x):
            return x + self.drop(self.fc2(self.act(self.fc1(x))))

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(7))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = Stack()
    moefx.moefy(model, num_experts=2, top_k=1, every=2, example_inputs=(torch.randn(4, 8),))
    console = Console(record=True, width=200, color_system=None)
    console.print(module_tree(model, candidates(moefx.passes.record.conversions(model))))
    text = console.export_text()
    assert "1, 3, 5 (×3) Block" in text, text
    assert "0, 2, …, 6 (×4) Block" in text, text
    assert "Folded (computed by blocks.*.fc1)" in text, text
    assert text.count("converted: mlp 8→32") == 1 and text.count("skipped: every=2") == 1, text


def test_layer_graph_names_values_in_the_layers_terms():
    """The router's input is ``x`` and its weight ``router.weight`` (not export's ``to``/``to_1``),
    route's outputs are ``weights``, ``expert_ids``, ``counts``; casts and reshapes are folded in."""
    layer = moefx.MoE(d_model=16, d_hidden=32, num_experts=4, top_k=2)
    steps = layer_graph(layer)
    shown = [s for s in steps if s.shown]
    assert [s.op for s in shown] == ["aten::linear", *MOE_OPS]
    by_op = {s.op: s for s in shown}
    assert by_op["aten::linear"].outputs == ("logits",) and by_op["aten::linear"].reads == ("x", "router.weight")
    assert by_op["moefx::route"].outputs == ("weights", "expert_ids", "counts")
    assert by_op["moefx::route"].reads == ("logits",)
    assert by_op["moefx::plan_dispatch"].reads == ("expert_ids",)
    assert by_op["moefx::gather_grouped_linear"].reads[:2] == ("x", "experts.in_proj")
    assert by_op["moefx::grouped_linear_combine"].outputs == ("out",)
    assert "weights" in by_op["moefx::grouped_linear_combine"].reads
    console = Console(record=True, width=120, color_system=None)
    console.print(graph_table("mlp", steps, layer=layer))
    text = console.export_text()
    assert "expert_ids (T, 2)" in text and "weights (T, 2)" in text and "counts (4,)" in text
    assert "x (T, 16) → out (T, 16)" in text
    assert "to_1" not in text and "aten::to" not in text and "aten::reshape" not in text
    console = Console(record=True, width=120, color_system=None)
    console.print(graph_table("mlp", steps, layer=layer, full=True))
    assert "aten::reshape" in console.export_text()
