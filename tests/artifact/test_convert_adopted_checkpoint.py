"""``moefx.convert`` on a checkpoint whose model already has MoE blocks (a Mixtral save_pretrained
directory): adoption needs the blocks' weights, so the checkpoint is loaded whole and converted in
memory (as ``moefx convert`` does), not streamed on meta. The output computes the original model."""

import logging

import pytest
import torch

import moefx
from tests.artifact.hf_native_cases import load_without_moefx, logits, relative_error
from tests.passes.adopt_models import hf_model

pytest.importorskip("transformers")
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    model = hf_model("mixtral")
    directory = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(directory)
    return directory, logits(model, IDS)


def test_moefx_format_loads_back_as_the_original(mixtral_dir, tmp_path, caplog):
    directory, expected = mixtral_dir
    with caplog.at_level(logging.WARNING, logger="moefx.converting"):
        moefx.convert(directory, tmp_path / "out")
    assert "existing MoE blocks" in caplog.text  # loaded in memory, and the user is told so
    back = moefx.load(tmp_path / "out").eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    assert len(list(moefx.moe_layers(back))) == 2
    assert relative_error(logits(back, IDS), expected) <= 1e-5


def test_hf_format_loads_natively_as_the_original(mixtral_dir, tmp_path):
    directory, expected = mixtral_dir
    moefx.convert(directory, tmp_path / "native", format="hf")
    loaded = load_without_moefx({"mixtral": tmp_path / "native"}, IDS, tmp_path)["mixtral"]
    assert loaded["class"] == "MixtralForCausalLM" and not loaded["problems"], loaded["problems"]
    assert relative_error(loaded["logits"], expected) <= 1e-5


def test_a_shard_size_for_the_one_file_moefx_output_is_refused(mixtral_dir, tmp_path):
    directory, _ = mixtral_dir
    with pytest.raises(ValueError, match="max_shard_size.*leave it out"):
        moefx.convert(directory, tmp_path / "out", max_shard_size="1MB")
    assert not (tmp_path / "out").exists()
