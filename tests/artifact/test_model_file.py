"""Model files: builders that import their neighbours, files that exit, inputs that are recorded."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from moefx.artifact.model_file import ModelFileError, load_model_file
from moefx.passes.record import input_spec, inputs_from_spec


def test_builder_may_import_a_neighbour_when_it_runs(tmp_path):
    (tmp_path / "blocks.py").write_text("from torch import nn\ndef mlp():\n    return nn.Linear(4, 4)\n")
    (tmp_path / "model.py").write_text("def build_model():\n    import blocks\n    return blocks.mlp()\n")
    built = load_model_file(tmp_path / "model.py")
    assert isinstance(built.model, torch.nn.Linear) and built.example_args is None


def test_a_file_that_exits_is_an_error_not_an_exit(tmp_path):
    (tmp_path / "model.py").write_text("import sys\nsys.exit(2)\n")
    with pytest.raises(ModelFileError, match=r"running the file failed at model.py:2 .*SystemExit"):
        load_model_file(tmp_path / "model.py")


def test_example_inputs_as_args_and_kwargs(tmp_path):
    (tmp_path / "model.py").write_text(
        "import torch\nmodel = torch.nn.Linear(3, 3)\n"
        "def example_inputs():\n    return (torch.zeros(2, 3),), {'scale': 2}\n"
    )
    built = load_model_file(tmp_path / "model.py")
    assert built.entry == "model" and built.example_args[0].shape == (2, 3) and built.example_kwargs == {"scale": 2}


def test_recorded_inputs_come_back_with_their_shapes_and_dtypes():
    Pair = namedtuple("Pair", "ids mask")
    value = ((Pair(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool)), 3), {"x": [torch.randn(4)]})
    args, kwargs = inputs_from_spec(input_spec(value))
    (ids, mask), three = args[0], args[1]
    assert ids.dtype == torch.long and ids.shape == (2, 5) and int(ids.abs().sum()) == 0
    assert mask.dtype == torch.bool and bool(mask.all()) and three == 3
    assert isinstance(kwargs["x"], list) and kwargs["x"][0].shape == (4,)


def test_only_python_files_are_model_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFileError, match=r"config.json is not a Python file: pass a Python model file \(\.py\) "
                                             r"defining build_model\(\) and example_inputs\(\)"):
        load_model_file(tmp_path / "config.json")
    with pytest.raises(ModelFileError, match=r"is a directory, not a model file: pass a Python model file \(\.py\)"):
        load_model_file(tmp_path)
    with pytest.raises(ModelFileError, match=r"model file .*nope.py not found: pass the path of a Python model file"):
        load_model_file(tmp_path / "nope.py")
