"""moefx.save / moefx.load: round trips onto dense models (real or meta), and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import moefx
from moefx.artifact.format import ArtifactError
from moefx.artifact.model_file import load_model_file
from tests.artifact.saved_cases import convert_and_save
from tests.passes.models import CASES


def _out(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_load_onto_a_meta_dense_model_reproduces_the_converted_one(tmp_path, case):
    model, args, kwargs, dense = convert_and_save(case, tmp_path / "out", init="drop-upcycle")
    loaded = moefx.load(tmp_path / "out", dense).eval()
    assert loaded is dense
    assert [p for p, _ in moefx.moe_layers(loaded)] == [p for p, _ in moefx.moe_layers(model)]
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with torch.no_grad():  # same weights; kernels may round differently on differently aligned memory
        torch.testing.assert_close(_out(loaded(*args, **kwargs)), _out(model(*args, **kwargs)), rtol=1e-6, atol=1e-6)


def test_tied_and_shared_weights_stay_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, use_cache=False, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    moefx.moefy(model, num_experts=2, example_inputs=(torch.randint(0, 64, (1, 5)),))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        moefx.save(model, f"{tmp}/out")
        with torch.device("meta"):
            dense = LlamaForCausalLM(config)
        loaded = moefx.load(f"{tmp}/out", dense)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_albert_like_shared_ffn_is_one_shared_moe_after_load(tmp_path):
    case = next(c for c in CASES if c.name == "albert_like")
    model = case.build()
    args, _ = case.inputs()
    moefx.moefy(model, num_experts=2, example_inputs=args)
    moefx.save(model, tmp_path / "out")
    loaded = moefx.load(tmp_path / "out", case.build())
    (path, layer), = moefx.moe_layers(loaded)  # one MoE, run by every layer of the stack
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), model(*args), rtol=1e-6, atol=1e-6)
    assert len(calls) == loaded.layers


def test_split_kmeans_round_trip(tmp_path):
    case = next(c for c in CASES if c.name == "llama")
    model = case.build().eval()
    args, kwargs = case.inputs()
    moefx.moefy(model, num_experts=4, top_k=4, init="split", split_by="kmeans", example_inputs=args, example_kwargs=kwargs)
    moefx.save(model, tmp_path / "out")
    loaded = moefx.load(tmp_path / "out", case.build()).eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded(*args, **kwargs)), _out(model(*args, **kwargs)), rtol=0, atol=0)


def test_sigmoid_gate_round_trip_keeps_its_groups_and_balancing_bias(tmp_path):
    case = next(c for c in CASES if c.name == "llama")
    model = case.build()
    args, kwargs = case.inputs()
    moefx.moefy(model, num_experts=8, top_k=2, gate="sigmoid", expert_groups=4, topk_groups=2, bias_update_rate=0.01,
                example_inputs=args, example_kwargs=kwargs)
    for _ in range(3):  # a trained bias, different per layer and expert
        model(*args, **kwargs)
        moefx.update_routing_bias(model)
    moefx.save(model, tmp_path / "out")
    loaded = moefx.load(tmp_path / "out", case.build())
    for (_, want), (_, got) in zip(moefx.moe_layers(model), moefx.moe_layers(loaded), strict=True):
        routing = ("gate", "top_k", "expert_groups", "topk_groups", "bias_update_rate", "renormalize")
        assert [getattr(got.config, f) for f in routing] == [getattr(want.config, f) for f in routing] == [
            "sigmoid", 2, 4, 2, 0.01, True]
        assert torch.equal(got.router.score_bias, want.router.score_bias) and want.router.score_bias.abs().sum() > 0
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(loaded(*args, **kwargs)), _out(model(*args, **kwargs)), rtol=1e-6, atol=1e-6)


def _mlp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)))


def test_loading_into_another_architecture_is_refused(tmp_path):
    model = _mlp_model()
    moefx.moefy(model, num_experts=2, example_inputs=(torch.randn(2, 8),))
    moefx.save(model, tmp_path / "out")
    other = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    with pytest.raises(ArtifactError, match="does not fit the weights"):
        moefx.load(tmp_path / "out", other)


def test_a_model_that_does_not_fit_is_left_as_it_was(tmp_path):
    model = _mlp_model()
    moefx.moefy(model, num_experts=2, example_inputs=(torch.randn(2, 8),))
    moefx.save(model, tmp_path / "out")
    bigger = nn.Sequential(*(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)) for _ in range(2)))
    before = {name: t.clone() for name, t in bigger.state_dict().items()}
    with pytest.raises(ArtifactError, match="model tensors not saved"):
        moefx.load(tmp_path / "out", bigger)
    assert list(moefx.moe_layers(bigger)) == [] and bigger.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[name]) for name, t in bigger.state_dict().items())


def test_directories_that_are_not_outputs_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match="is not a moefx output"):
        moefx.load(tmp_path)
    model = _mlp_model()
    moefx.moefy(model, num_experts=2, example_inputs=(torch.randn(2, 8),))
    moefx.save(model, tmp_path / "out")
    with pytest.raises(ArtifactError, match="records no model file"):
        moefx.load(tmp_path / "out")
    manifest = tmp_path / "out" / "moefx.json"
    text = manifest.read_text()
    manifest.write_text(json.dumps({**json.loads(text), "format_version": 99}))
    with pytest.raises(ArtifactError, match="version 99"):
        moefx.load(tmp_path / "out", _mlp_model())
    for broken in (b"{not json", b"\xff\xfe"):
        manifest.write_bytes(broken)
        with pytest.raises(ArtifactError, match=r"moefx.json is not valid JSON .*write the output again"):
            moefx.load(tmp_path / "out", _mlp_model())
    manifest.write_text("[]")
    with pytest.raises(ArtifactError, match=r"holds a JSON list, not moefx's record"):
        moefx.load(tmp_path / "out", _mlp_model())
    manifest.write_text(text)
    (tmp_path / "out" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=r"model.safetensors cannot be read .*write the output again"):
        moefx.load(tmp_path / "out", _mlp_model())


def test_saving_meta_weights_is_refused_and_writes_nothing(tmp_path):
    with torch.device("meta"):
        model = _mlp_model()
    moefx.moefy(model, num_experts=2, example_inputs=(torch.randn(2, 8),))
    with pytest.raises(ArtifactError, match="meta device"):
        moefx.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _converted_from_a_model_file(project):
    """A model file in ``project`` and its conversion saved to ``project/out``, as moefx convert does."""
    project.mkdir()
    (project / "model.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build_model():\n    return nn.Sequential(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8)))\n\n"
        "def example_inputs():\n    return (torch.randn(2, 8),)\n"
    )
    built = load_model_file(project / "model.py")
    moefx.moefy(built.model, num_experts=2, example_inputs=built.example_args)
    moefx.save(built.model, project / "out", source={"file": str(built.path), "entry": built.entry})
    return built.model


def test_a_loaded_model_saved_again_keeps_its_model_file(tmp_path):
    converted = _converted_from_a_model_file(tmp_path / "project")
    moefx.save(moefx.load(tmp_path / "project" / "out"), tmp_path / "resaved")  # e.g. after fine-tuning
    _assert_same_tensors(moefx.load(tmp_path / "resaved"), converted)


def test_a_project_moved_whole_still_loads(tmp_path):
    converted = _converted_from_a_model_file(tmp_path / "project")
    (tmp_path / "project").rename(tmp_path / "moved")  # model file and output together
    _assert_same_tensors(moefx.load(tmp_path / "moved" / "out"), converted)


def _assert_same_tensors(got: nn.Module, want: nn.Module) -> None:
    got, want = got.state_dict(), want.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_loading_after_the_model_file_moved_names_both_fixes(tmp_path):
    _converted_from_a_model_file(tmp_path / "project")
    assert isinstance(moefx.load(tmp_path / "project" / "out"), nn.Sequential)  # the control: the file is there
    (tmp_path / "project" / "model.py").rename(tmp_path / "project" / "moved.py")
    with pytest.raises(ArtifactError, match=r"model.py, which is not there any more: put the file back.*model=\.\.\."):
        moefx.load(tmp_path / "project" / "out")


def test_saving_a_model_that_was_never_converted_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match=r"Sequential has no MoE layer.*moefx.moefy"):
        moefx.save(_mlp_model(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_loading_into_a_converted_model_keeps_its_parameters(tmp_path):
    """An optimizer built before load must update the loaded weights, not orphans."""
    model = _mlp_model()
    moefx.moefy(model, num_experts=2, example_inputs=(torch.randn(2, 8),))
    moefx.save(model, tmp_path / "out")
    other = _mlp_model()
    moefx.moefy(other, num_experts=2, example_inputs=(torch.randn(2, 8),), init="random")
    before = {name: p for name, p in other.named_parameters()}
    moefx.load(tmp_path / "out", other)
    for name, p in other.named_parameters():
        assert p is before[name], name
        assert torch.equal(p, model.get_parameter(name)), name


def test_save_writes_into_an_existing_empty_directory(tmp_path):
    import tempfile

    model = _mlp_model()
    moefx.moefy(model, num_experts=2, example_inputs=(torch.randn(2, 8),))
    out = tempfile.mkdtemp(dir=tmp_path)  # as save_pretrained and DCP accept
    moefx.save(model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(out).name], "a temporary directory was left"
    _assert_same_tensors(moefx.load(out, _mlp_model()), model)
    other = tmp_path / "project"  # not empty and not a moefx output: still refused, even forced
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FileExistsError):
            moefx.save(model, other, force=force)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_save_where_a_file_is_in_the_way_says_so(tmp_path):
    model = _mlp_model()
    moefx.moefy(model, num_experts=2, example_inputs=(torch.randn(2, 8),))
    (tmp_path / "afile").write_text("mine")
    for target, words in ((tmp_path / "afile", "afile is a file, not a directory: choose another output directory"),
                          (tmp_path / "afile" / "sub", "afile is a file, not a directory, so")):
        for force in (False, True):
            with pytest.raises(FileExistsError) as refused:
                moefx.save(model, target, force=force)
            assert words in str(refused.value) and "force" not in str(refused.value)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "mine"


def test_loading_a_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(ArtifactError, match=r"nope does not exist: pass the directory that moefx convert"):
        moefx.load(tmp_path / "nope")


def _unchanged(model: nn.Module):
    before = {name: t.clone() for name, t in model.state_dict().items()}

    def check():
        assert list(moefx.moe_layers(model)) == [] and model.state_dict().keys() == before.keys()
        assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    return check


def test_loading_into_a_model_of_another_family_names_what_was_expected_and_found(tmp_path):
    cases = {c.name: c for c in CASES}
    llama = cases["llama"].build()
    args, kwargs = cases["llama"].inputs()
    moefx.moefy(llama, num_experts=2, example_inputs=args, example_kwargs=kwargs)
    moefx.save(llama, tmp_path / "llama")
    gpt2 = cases["gpt2"].build()
    check = _unchanged(gpt2)
    with pytest.raises(ArtifactError) as refused:
        moefx.load(tmp_path / "llama", gpt2)
    message = str(refused.value)
    assert "GPT2Model does not match the conversion recorded in" in message and "include" not in message
    assert "expected FFNs at [layers.0.mlp, layers.1.mlp], found FFN candidates at [h.0.mlp" in message
    assert "pass the dense model the output was converted from" in message
    check()

    model = _mlp_model()
    moefx.moefy(model, num_experts=2, example_inputs=(torch.randn(2, 8),))
    moefx.save(model, tmp_path / "mlp")
    for other, words in (
        (nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), "expected FFNs at [0], found no FFN candidate"),
        (nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)),
         "its forward fails on the example inputs recorded there (RuntimeError"),
    ):
        check = _unchanged(other)
        with pytest.raises(ArtifactError, match="Sequential does not match the conversion recorded in") as refused:
            moefx.load(tmp_path / "mlp", other)
        assert words in str(refused.value), str(refused.value)
        check()


def test_a_long_list_of_expected_ffns_is_shortened():
    from moefx.artifact.load import _shortened

    paths = [f"model.layers.{i}.mlp" for i in range(32)]
    assert _shortened(paths) == "[model.layers.0.mlp, model.layers.1.mlp, model.layers.2.mlp, model.layers.3.mlp, … (28 more)]"
    assert _shortened(paths[:2]) == "[model.layers.0.mlp, model.layers.1.mlp]"


def test_loading_into_a_model_converted_with_other_routing_is_refused(tmp_path):
    # Same tensor shapes (4 experts of the same size), other gate, top-k and capacity: filling the
    # model would route differently from the saved one, silently.
    def converted(**options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        return moefx.moefy(model, num_experts=4, example_inputs=(torch.randn(3, 8),), **options)

    moefx.save(converted(top_k=1, gate="switch", capacity_factor=1.25), tmp_path / "switch")
    target = converted(top_k=2)
    before = {name: t.clone() for name, t in target.state_dict().items()}
    refusal = r"differ from those saved.*top_k: the model's 2, saved 1.*gate: the model's 'topk', saved 'switch'"
    with pytest.raises(ArtifactError, match=refusal):
        moefx.load(tmp_path / "switch", target)
    assert all(torch.equal(t, before[name]) for name, t in target.state_dict().items()), "the model was changed"
    same = converted(top_k=1, gate="switch", capacity_factor=1.25)
    assert moefx.load(tmp_path / "switch", same) is same  # the same options load as before
