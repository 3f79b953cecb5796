"""Router initialisation (``moefx.init.router_init``): where routers start, what they do at step 0,
and that upcycle stays exact with every router init."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moefx
from moefx.init.router_init import kmeans_router_
from moefx.passes.record import conversions
from tests.cli.helpers import moefx as run_moefx
from tests.cli.helpers import write_model_file

D, E = 16, 4


def _grouped_template(gated: bool, h_per_group: int = 6, seed: int = 0):
    """An FFN whose hidden neurons form E groups; group g's input rows point along direction d_g
    (plus a little noise), so the neurons of a group fire on inputs near d_g. Neurons are shuffled
    so a contiguous split would mix the groups."""
    g = torch.Generator().manual_seed(seed)
    directions_ED = F.normalize(torch.randn(E, D, generator=g, dtype=torch.float64), dim=1)
    group_H = torch.arange(E).repeat_interleave(h_per_group)[torch.randperm(E * h_per_group, generator=g)]
    rows_HD = directions_ED[group_H] * 3 + 0.05 * torch.randn(E * h_per_group, D, generator=g, dtype=torch.float64)
    down_DH = torch.randn(D, E * h_per_group, generator=g, dtype=torch.float64) / 4
    template = moefx.FFNTemplate(
        up_weight=rows_HD.clone() if not gated else rows_HD.flip(1),
        gate_weight=rows_HD.clone() if gated else None, down_weight=down_DH,
        activation=nn.SiLU() if gated else nn.ReLU(),
    )
    return template, directions_ED, group_H


def _tokens_near(directions_ED, per_group: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = directions_ED.repeat_interleave(per_group, 0) * 4
    return x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype), torch.arange(E).repeat_interleave(per_group)


def _group_of_expert(layer, template, group_H):
    """Which neuron group each expert of a kmeans split holds (the majority of its neurons)."""
    rows = layer.experts.in_proj[:, : layer.config.d_hidden]  # gate rows (gated) or up rows
    source = template.gate_weight if template.gated else template.up_weight
    groups = []
    for e in range(E):
        held = [int((source == row).all(1).nonzero()[0]) for row in rows[e]]
        groups.append(int(group_H[held].mode().values))
    return groups


@pytest.mark.parametrize("gated", [True, False])
def test_weights_router_sends_each_token_to_the_expert_whose_neurons_it_excites(gated):
    template, directions_ED, group_H = _grouped_template(gated)
    layer = moefx.MoE.from_ffn(template, num_experts=E, top_k=1, init="split", split_by="kmeans", router_init="weights")
    holds = _group_of_expert(layer, template, group_H)
    assert sorted(holds) == list(range(E)), "the kmeans split should put one neuron group in each expert"
    x, group_T = _tokens_near(directions_ED, 5)
    routing = layer.router(x)
    torch.testing.assert_close(routing.experts_TK[:, 0], torch.tensor([holds.index(g) for g in group_T.tolist()]))


def test_split_defaults_to_the_weights_router_and_spreads_tokens_from_step_0():
    template, directions_ED, _ = _grouped_template(True)
    x, _ = _tokens_near(directions_ED, 8)
    default = moefx.MoE.from_ffn(template, num_experts=E, top_k=2, init="split", split_by="kmeans")
    zero = moefx.MoE.from_ffn(template, num_experts=E, top_k=2, init="split", split_by="kmeans", router_init="random")
    default(x), zero(x)
    assert (zero.stats().routed_per_expert > 0).sum() == 2, "a zero router ties: every token picks the same 2"
    assert (default.stats().routed_per_expert > 0).all()
    assert int(default.stats().routed_per_expert.max()) <= x.shape[0]  # no expert takes every token's first choice


def test_weights_router_on_identical_experts_keeps_the_random_router(caplog):
    template, _, _ = _grouped_template(True)
    torch.manual_seed(0)
    random = moefx.MoE.from_ffn(template, num_experts=E, top_k=2, init="upcycle", router_init="random")
    torch.manual_seed(0)
    weights = moefx.MoE.from_ffn(template, num_experts=E, top_k=2, init="upcycle", router_init="weights")
    torch.testing.assert_close(weights.router.weight, random.router.weight)
    assert "experts are identical" in caplog.text


@pytest.mark.parametrize("gated", [True, False])
def test_kmeans_router_routes_each_cluster_to_the_expert_that_responds_to_it(gated):
    template, directions_ED, group_H = _grouped_template(gated)
    layer = moefx.MoE.from_ffn(template, num_experts=E, top_k=1, init="split", split_by="kmeans", router_init="random")
    calibration, _ = _tokens_near(directions_ED, 40, seed=2)
    kmeans_router_(layer, calibration)
    x, group_T = _tokens_near(directions_ED, 6, seed=3)
    chosen_T = layer.router(x).experts_TK[:, 0]
    # Reference: the expert whose output on the token is largest (a slow loop over experts).
    outputs_ET = torch.stack([
        layer.experts(x, torch.tensor([0] * (e + 1) + [len(x)] * (E - e))).norm(dim=1) for e in range(E)
    ])
    torch.testing.assert_close(chosen_T, outputs_ET.argmax(0))
    assert len(set(chosen_T.tolist())) == E


def test_kmeans_router_needs_as_many_tokens_as_experts():
    layer = moefx.MoE(d_model=D, d_hidden=8, num_experts=E, top_k=1)
    with pytest.raises(ValueError, match=r"at least num_experts=4 calibration tokens per layer, got 3"):
        kmeans_router_(layer, torch.randn(3, D))


def test_from_ffn_refuses_kmeans_and_names_where_it_works():
    template, _, _ = _grouped_template(True)
    with pytest.raises(ValueError, match=r"router_init='kmeans' is not one MoE.from_ffn can apply.*moefy"):
        moefx.MoE.from_ffn(template, num_experts=E, top_k=1, init="split", router_init="kmeans")


# --- moefy on a transformers model -------------------------------------------------------------------

VOCAB = 97


def _llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    )).double().eval()


def _ids(batch, seq, seed):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router_init", ["random", "weights", "kmeans"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycle_stays_exact_with_every_router_init(router_init, top_k):
    dense = _llama()
    ids, held_out = _ids(2, 12, 0), _ids(3, 10, 1)
    model = moefx.moefy(copy.deepcopy(dense), E, top_k, example_inputs=(ids,), init="upcycle", router_init=router_init,
                        calibration=_ids(4, 16, 2) if router_init == "kmeans" else None)
    torch.testing.assert_close(model(held_out).last_hidden_state, dense(held_out).last_hidden_state)
    loads = [layer.stats().routed_per_expert for _, layer in moefx.moe_layers(model)]
    assert all((load > 0).sum() > top_k for load in loads), f"routing should not be trivial: {loads}"


def test_kmeans_is_recorded_and_the_saved_model_loads(tmp_path):
    dense = _llama()
    ids, calibration = _ids(2, 12, 0), _ids(4, 16, 2)
    model = moefx.moefy(copy.deepcopy(dense), E, 2, example_inputs=(ids,), init="split", router_init="kmeans",
                        calibration=calibration)
    record = conversions(model)[-1]
    assert record.options.router_init == "kmeans"
    assert record.router_calibration == "calibration inputs (4x16 int64)"
    # The routers are the calibration's centroids: not the zero router split starts from.
    assert all(layer.router.weight.abs().sum() > 0 for _, layer in moefx.moe_layers(model))
    moefx.save(model, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "moefx.json").read_text())
    assert manifest["conversions"][-1]["options"]["router_init"] == "kmeans"
    assert manifest["conversions"][-1]["router_calibration"] == "calibration inputs (4x16 int64)"
    loaded = moefx.load(tmp_path / "out", model=copy.deepcopy(dense))
    held_out = _ids(3, 10, 1)
    torch.testing.assert_close(loaded(held_out).last_hidden_state, model(held_out).last_hidden_state)


def test_split_records_its_default_router_init():
    model = moefx.moefy(_llama(), E, 2, example_inputs=(_ids(2, 12, 0),), init="split")
    assert conversions(model)[-1].options.router_init == "weights"
    model = moefx.moefy(_llama(), E, E, example_inputs=(_ids(2, 12, 0),), init="split")
    assert conversions(model)[-1].options.router_init == "random"  # all experts active: the zero router is exact


def test_calibration_the_forward_refuses_changes_nothing():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"forward fails on the calibration inputs .*nothing converted"):
        moefx.moefy(model, E, 2, example_inputs=(_ids(2, 12, 0),), router_init="kmeans",
                    calibration=torch.randn(2, 3))
    assert next(moefx.moe_layers(model), None) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_without_kmeans_is_refused():
    with pytest.raises(ValueError, match=r"calibration= is only read by router_init='kmeans'"):
        moefx.moefy(_llama(), E, 2, example_inputs=(_ids(2, 12, 0),), calibration=_ids(2, 8, 1))


def test_unknown_router_init_is_refused():
    with pytest.raises(ValueError, match=r"router_init='centroids' is unknown: must be one of \['random', 'weights', 'kmeans'\]"):
        moefx.moefy(_llama(), E, 2, example_inputs=(_ids(2, 12, 0),), router_init="centroids")


# --- the command ---------------------------------------------------------------------------------------

LLAMA_FILE = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def build_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, use_cache=False))

def example_inputs():
    return (torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0)),)
"""


def test_convert_with_kmeans_and_a_calibration_file_records_both(tmp_path):
    model_py = write_model_file(tmp_path, LLAMA_FILE)
    ids = torch.randint(0, VOCAB, (3 * 12,), generator=torch.Generator().manual_seed(5))
    (tmp_path / "calib.txt").write_text(" ".join(map(str, ids.tolist())))
    done = run_moefx("convert", model_py, "--experts", "4", "--init", "split", "--router-init", "kmeans",
                     "--calibration", tmp_path / "calib.txt", "--out", tmp_path / "out", "--json", cwd=tmp_path)
    assert done.code == 0, done.err
    written = json.loads(done.out)["conversions"][-1]
    assert written["options"]["router_init"] == "kmeans"
    assert written["router_calibration"] == "calib.txt (3x12 token ids)"
    shown = run_moefx("inspect", tmp_path / "out", cwd=tmp_path)
    assert shown.code == 0, shown.err
    assert "router init kmeans (calib.txt (3x12 token ids))" in " ".join(shown.out.split())


def test_convert_refuses_a_calibration_file_without_kmeans(tmp_path):
    model_py = write_model_file(tmp_path, LLAMA_FILE)
    (tmp_path / "calib.txt").write_text("1 2 3")
    done = run_moefx("convert", model_py, "--experts", "4", "--calibration", tmp_path / "calib.txt",
                     "--out", tmp_path / "out", cwd=tmp_path)
    assert done.code == 2
    assert "--calibration is only read by --router-init kmeans" in done.err
    assert not (tmp_path / "out").exists()


def _read(file, args=None, kwargs=None, tokenizer_dir=None, vocab=VOCAB):
    from moefx.cli.calibration import read_calibration

    args = (torch.zeros(2, 6, dtype=torch.long),) if args is None else args

    model = nn.Module()
    model.config = type("Config", (), {"vocab_size": vocab})()
    return read_calibration(file, model, args, kwargs or {}, tokenizer_dir)


def test_calibration_files_of_token_ids(tmp_path):
    from safetensors.torch import save_file

    from moefx.cli.checks import CLIError

    ids = torch.arange(30).view(3, 10)
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    read = _read(tmp_path / "ids.safetensors")
    assert torch.equal(read.args[0], ids) and read.source == "ids.safetensors (3x10 token ids)"
    torch.save(torch.arange(20), tmp_path / "ids.pt")  # flat: cut into rows of the example's length, 6
    mask = torch.zeros(2, 6, dtype=torch.long)
    read = _read(tmp_path / "ids.pt", args=(), kwargs={"input_ids": mask, "attention_mask": mask})
    assert torch.equal(read.kwargs["input_ids"], torch.arange(18).view(3, 6))
    assert torch.equal(read.kwargs["attention_mask"], torch.ones(3, 6, dtype=torch.long))
    (tmp_path / "big.txt").write_text("1 2 500")
    with pytest.raises(CLIError, match=r"token ids must lie in \[0, 97\).*found 1\.\.500"):
        _read(tmp_path / "big.txt")
    (tmp_path / "text.txt").write_text("the cat sat")
    with pytest.raises(CLIError, match="holds text, and a model file has no tokenizer"):
        _read(tmp_path / "text.txt")


def test_calibration_text_is_tokenised_with_the_checkpoints_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path / "checkpoint")
    (tmp_path / "text.txt").write_text("the cat sat on the mat dog")
    read = _read(tmp_path / "text.txt", args=(torch.zeros(1, 7, dtype=torch.long),), tokenizer_dir=tmp_path / "checkpoint")
    assert read.args[0].tolist() == [[1, 2, 3, 4, 1, 5, 0]]
    assert read.source == "text.txt (1x7 tokens of text)"
