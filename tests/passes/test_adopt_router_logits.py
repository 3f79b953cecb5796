"""A transformers MoE model with ``output_router_logits=True`` (its router outputs recorded by class,
through output-capturing hooks): moefy refuses it before changing anything, and a moefy that fails
after adopting leaves the model exactly as it was (its blocks and its hooks), so it runs as before."""

from __future__ import annotations

import copy

import pytest
import torch

import moefx
from moefx.layer.moe import MoE
from moefx.passes.adopt import AdoptionError
from tests.passes.adopt_models import hf_model

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def _same_as(model, reference) -> None:
    """``model`` is the untouched ``reference``: no moefx layer, same logits and router logits."""
    assert not any(isinstance(m, MoE) for m in model.modules())
    got, want = model(IDS), reference(IDS)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert len(got.router_logits) == len(want.router_logits) > 0
    for g, w in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_router_logits_model_is_refused_and_left_as_it_was(family):
    model = hf_model(family, output_router_logits=True).eval()
    reference = copy.deepcopy(model)  # never run before moefy: its recorder hooks are not installed yet
    with pytest.raises(AdoptionError, match="output_router_logits"):
        moefx.moefy(model, example_inputs=(IDS,))
    _same_as(model, reference)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_failed_moefy_puts_back_the_hooks(family):
    """The example kwargs ask for router logits, so capture's trial run installs transformers' recorders
    on the adopted layers (and marks the model hooked) before it fails: undo must remove both."""
    model = hf_model(family).eval()
    reference = copy.deepcopy(model)
    with pytest.raises(Exception, match="load_balancing_loss_func|router"):
        moefx.moefy(model, example_inputs=(IDS,), example_kwargs={"output_router_logits": True})
    model.config.output_router_logits = reference.config.output_router_logits = True
    _same_as(model, reference)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_router_logits_off_adopts(family):
    model = hf_model(family, output_router_logits=True).eval()
    reference = copy.deepcopy(model)
    model.config.output_router_logits = False  # the way out the error names
    moefx.moefy(model, example_inputs=(IDS,))
    assert any(isinstance(m, MoE) for m in model.modules())
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-5, atol=1e-5)
