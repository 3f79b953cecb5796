"""What moefx does works on adopted models (issue 22 item 4): expert parallelism (EP = 2 equals the
single process in float64), save/load, offload with a quarter of the expert bytes, export."""

from __future__ import annotations

import copy

import torch

import moefx
from moefx.model import expert_size
from tests.parallel.test_expert_parallel import ROOT, torchrun
from tests.passes.adopt_models import hf_model

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def _adopted(family: str = "mixtral", **overrides):
    model = hf_model(family, **overrides)
    moefx.moefy(model, example_inputs=(IDS,))
    return model


def _relative(got, want) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_expert_parallel_adopted_model_equals_the_single_process():
    out = torchrun(2, ROOT / "tests" / "passes" / "adopt_ep_worker.py")
    assert out.count("adopted ep ok") == 2, out


def test_save_and_load_rebuild_the_adopted_layers(tmp_path):
    for family in ("gpt_oss", "qwen2_moe"):  # router bias, clamped SwiGLU, router scores; shared-expert gate
        model = _adopted(family)
        moefx.save(model, tmp_path / family)
        loaded = moefx.load(tmp_path / family, model=hf_model(family))
        assert [n for n, _ in moefx.moe_layers(loaded)] == [n for n, _ in moefx.moe_layers(model)]
        with torch.no_grad():
            assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_offload_with_a_quarter_of_the_expert_bytes_gives_the_resident_outputs():
    model = _adopted(num_local_experts=8)
    with torch.no_grad():
        want = model(IDS).logits
    layers = [layer for _, layer in moefx.moe_layers(model)]
    expert_bytes = sum(expert_size(layer) * layer.config.num_experts * 4 for layer in layers)
    moefx.offload(model, device="cpu", budget_bytes=expert_bytes // 4)
    with torch.no_grad():
        assert _relative(model(IDS).logits, want) <= 1e-6


def test_export_adopted_model(tmp_path):
    model = _adopted("deepseek_v3")  # sigmoid routing, groups, shared experts, a dense layer converted too
    eager = copy.deepcopy(model)
    path = moefx.export(model, tmp_path / "model.pt2", example_inputs=(IDS,))
    program = torch.export.load(path)
    other = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = program.module()(other)
        want = eager(other).logits
    got = got["logits"] if isinstance(got, dict) else got[0]
    assert _relative(got, want) <= 1e-5
