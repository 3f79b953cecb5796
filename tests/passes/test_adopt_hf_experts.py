"""experts_implementation="moefx": an unconverted transformers MoE runs its experts on moefx's ops,
with the outputs and gradients of transformers' eager loop."""

from __future__ import annotations

import copy

import pytest
import torch

import moefx.hf_experts
from tests.passes.adopt_models import hf_model

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(8))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3"])  # plain; transposed, interleaved, biases
def test_moefx_experts_implementation_equals_eager(family):
    moefx.hf_experts.register()
    eager = hf_model(family)
    eager.set_experts_implementation("eager")
    ours = copy.deepcopy(eager)
    ours.set_experts_implementation("moefx")
    assert ours.config._experts_implementation == "moefx"
    want, got = eager(IDS, labels=IDS), ours(IDS, labels=IDS)
    assert float((got.logits - want.logits).detach().abs().max() / want.logits.detach().abs().max()) <= 1e-5
    want.loss.backward()
    got.loss.backward()
    for (name, p), (_, q) in zip(eager.named_parameters(), ours.named_parameters()):
        if name.endswith(("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")) and p.dim() >= 2:
            assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6), name
