"""Every failure of ``moefx convert``: the exit code, one line on stderr that names the problem and
the fix, no traceback, and nothing written."""

from __future__ import annotations

import json

import pytest

from tests.cli.helpers import MLP_MODEL, moefx, write_model_file

CONV_NET = """
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))

def example_inputs():
    return (torch.randn(1, 3, 12, 12),)
"""

DATA_DEPENDENT = """
import torch
from torch import nn

class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.down(torch.relu(self.up(x)))

def build_model():
    return Gated()
"""

# Runs on its inputs, but neither capture can follow `if x.sum() > 0`.
ITEM_IN_FORWARD = DATA_DEPENDENT + """
def example_inputs():
    return (torch.randn(3, 8),)
"""

CASES = {
    # name: (model file body or None for a missing file, extra args, exit code, words the line must hold)
    "missing file": (None, [], 2, ["nope.py not found", "build_model()"]),
    "syntax error": ("import torch\ndef build_model(:\n    pass\n", [], 1, ["model.py:2", "syntax error"]),
    "build fails": (
        "def build_model():\n    raise RuntimeError('no weights here')\n", [], 1,
        ["build_model() failed at model.py:2", "RuntimeError: no weights here"],
    ),
    "no builder": ("x = 1\n", [], 1, ["neither build_model() nor a `model` object", "--entry"]),
    "unknown entry": (MLP_MODEL, ["--entry", "make_it"], 1, ["no 'make_it'", "build_model"]),
    "inputs needed": (DATA_DEPENDENT, [], 1, ["defines no example_inputs()", "define example_inputs()"]),
    "capture fails": (
        ITEM_IN_FORWARD, [], 1,
        ["cannot capture Gated", "model.py:11 in forward (if x.sum() > 0:) depends on a tensor's values", "torch.where"],
    ),
    "no ffn": (CONV_NET, [], 1, ["no feed-forward block found", "nothing written"]),
    "one expert": (MLP_MODEL, ["--experts", "1"], 2, ["--experts 1", "at least 2"]),
    "experts not an integer": (MLP_MODEL, ["--experts", "four"], 2, ["--experts must be an integer", "'four'"]),
    "top-k zero": (MLP_MODEL, ["--top-k", "0"], 2, ["--top-k 0 must be between 1 and --experts (8)"]),
    "top-k above experts": (MLP_MODEL, ["--experts", "4", "--top-k", "5"], 2, ["--top-k 5 must be between 1 and --experts (4)"]),
    "capacity zero": (MLP_MODEL, ["--capacity-factor", "0"], 2, ["--capacity-factor 0.0 must be > 0"]),
    "unknown init": (MLP_MODEL, ["--init", "magic"], 2, ["--init 'magic' is unknown", "upcycle"]),
    "unknown gate": (MLP_MODEL, ["--gate", "magic"], 2, ["--gate 'magic' is unknown", "topk"]),
    "inputs the model rejects": (
        MLP_MODEL.replace("torch.randn(3, 8)", "torch.randn(3, 5)"), [], 1,
        ["fails on the example inputs", "mat1 and mat2 shapes cannot be multiplied"],
    ),
    "gate needs top-1": (MLP_MODEL, ["--gate", "switch", "--top-k", "2"], 2, ["top_k", "must be 1 for gate='switch'"]),
    "groups without sigmoid": (MLP_MODEL, ["--expert-groups", "2"], 2, ["expert_groups=2", "needs gate='sigmoid'"]),
}


def test_top_k_defaults_to_what_the_gate_needs(tmp_path):
    write_model_file(tmp_path, MLP_MODEL)
    for gate, top_k in (("switch", 1), ("gshard", 2), ("topk", 2)):
        result = moefx("convert", "model.py", "--gate", gate, "-o", gate, cwd=tmp_path)
        assert result.code == 0, result.err
        (layer,) = json.loads((tmp_path / gate / "moefx.json").read_text())["moe_layers"]
        assert (layer["gate"], layer["top_k"]) == (gate, top_k)


@pytest.mark.parametrize("name", list(CASES))
def test_failure_is_one_clear_line_and_writes_nothing(tmp_path, name):
    body, extra, code, words = CASES[name]
    file = "nope.py" if body is None else write_model_file(tmp_path, body).name
    before = set(tmp_path.iterdir())
    result = moefx("convert", file, *extra, cwd=tmp_path)
    assert result.code == code, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moefx: error: "), result.err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert set(tmp_path.iterdir()) == before, "something was written"
    assert result.out == ""


def test_existing_output_is_refused_and_left_alone(tmp_path):
    write_model_file(tmp_path, MLP_MODEL)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = moefx("convert", "model.py", "-o", "out", cwd=tmp_path)
    assert result.code == 2
    assert "already exists" in result.err and "not an output of this kind" in result.err
    assert "--force replaces only an earlier output" in result.err  # never a bare suggestion that would refuse
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_debug_shows_the_traceback(tmp_path):
    write_model_file(tmp_path, "def build_model():\n    raise RuntimeError('no weights here')\n")
    result = moefx("convert", "model.py", "--debug", cwd=tmp_path)
    assert result.code == 1
    assert "Traceback (most recent call last)" in result.err
    assert result.err.strip().splitlines()[-1].startswith("moefx: error: ")


def test_no_command_is_a_usage_error(tmp_path):
    result = moefx(cwd=tmp_path)
    assert result.code == 2 and "no command given" in result.err


def test_version_names_moefx_torch_and_triton(tmp_path):
    import torch

    import moefx as package

    result = moefx("--version", cwd=tmp_path)
    assert result.code == 0 and result.out.startswith(f"moefx {package.__version__} (torch {torch.__version__}, triton ")


def test_force_never_replaces_a_directory_that_is_not_a_moefx_output(tmp_path):
    write_model_file(tmp_path, MLP_MODEL)
    result = moefx("convert", "model.py", "-o", ".", "--force", cwd=tmp_path)
    assert result.code == 2 and "not an output of this kind (no moefx.json" in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]


def test_inspect_checks_its_options_before_loading(tmp_path):
    write_model_file(tmp_path, MLP_MODEL)
    result = moefx("inspect", "model.py", "--gate", "switch", "--top-k", "2", cwd=tmp_path)
    assert result.code == 2 and "must be 1 for gate='switch'" in result.err


def test_an_existing_empty_output_directory_is_written_into(tmp_path):
    import tempfile
    from pathlib import Path

    write_model_file(tmp_path, MLP_MODEL)
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    result = moefx("convert", "model.py", "-o", out.name, cwd=tmp_path)
    assert result.code == 0, result.err
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "moefx.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.py", out.name]), "a temporary directory was left"


@pytest.mark.parametrize("out, force", [("afile", False), ("afile", True), ("afile/sub", False), ("afile/sub", True)])
def test_an_output_path_where_a_file_is_is_a_usage_error(tmp_path, out, force):
    write_model_file(tmp_path, MLP_MODEL)
    (tmp_path / "afile").write_text("mine")
    result = moefx("convert", "model.py", "-o", out, *(["--force"] if force else []), cwd=tmp_path)
    assert result.code == 2, result.err
    (line,) = result.err.strip().splitlines()
    assert line.startswith(f"moefx: error: {tmp_path / 'afile'} is a file, not a directory"), line
    assert "choose another output directory (-o)" in line and "--force" not in line and "Errno" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "model.py"]
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("source, words", [
    ("adir", "adir has no config.json: pass a transformers checkpoint directory (written by save_pretrained), or a "
             "Python model file defining build_model()"),
    ("config.json", "config.json is not a Python file: pass a Python model file (.py) defining build_model()"),
])
def test_a_source_that_is_not_a_model_file_is_a_usage_error(tmp_path, source, words):
    (tmp_path / "adir").mkdir()
    (tmp_path / "config.json").write_text("{}")
    before = set(tmp_path.iterdir())
    result = moefx("convert", source, cwd=tmp_path)
    assert result.code == 2, result.err
    (line,) = result.err.strip().splitlines()
    assert line.startswith("moefx: error: ") and words in line, line
    assert set(tmp_path.iterdir()) == before and result.out == ""


@pytest.mark.parametrize("target, words", [
    ("missing", ["missing does not exist", "a directory that moefx convert wrote"]),
    ("emptydir", ["emptydir is a directory but not a moefx output", "no moefx.json"]),
    ("notes.txt", ["notes.txt is not a Python file", "a directory that moefx convert wrote"]),
])
def test_inspect_of_something_it_cannot_show_is_a_usage_error(tmp_path, target, words):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "notes.txt").write_text("not a model\n")
    result = moefx("inspect", target, cwd=tmp_path)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.err


def test_options_that_leave_nothing_to_convert_name_the_way_out(tmp_path):
    write_model_file(tmp_path, MLP_MODEL)
    result = moefx("convert", "model.py", "--include", "nomatch*", cwd=tmp_path)
    assert result.code != 0 and "widen include, narrow exclude or lower every" in result.err, result.err
