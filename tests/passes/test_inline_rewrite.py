"""FFNs written inside a bigger forward (no module of their own): the rewrite re-traces their
module with torch.fx. Those it cannot rewrite there are left dense, with the reason, and the
other FFNs still convert; nothing is changed before every such check has passed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import moefx


@fx.wrap
def _wrapped_gelu(h: torch.Tensor) -> torch.Tensor:
    """torch.fx keeps a wrapped function as one opaque call; export traces through it."""
    return F.gelu(h)


class CastInBetween(nn.Module):
    """Casts between the projections, written as mixed-precision code does."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x).float()).to(x.dtype))


class TrainFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        return x + self.down(F.dropout(F.gelu(self.up(x)), 0.1, self.training))


class OpaqueToFx(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        return x + self.down(_wrapped_gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, *blocks: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _convert(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Dense and converted outputs (upcycle, top_k = num_experts: equal), and the MoE paths."""
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        dense = model(x)
    moefx.moefy(model, num_experts=2, top_k=2, example_inputs=(x,))
    with torch.no_grad():
        return dense, model(x), [path for path, _ in moefx.moe_layers(model)]


def test_casts_that_read_the_input_dtype_convert():
    dense, converted, paths = _convert(Stack(CastInBetween(), CastInBetween()))
    assert len(paths) == 2
    torch.testing.assert_close(converted, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks,converted,left,reason", [
    # forward reads self.training: fx would freeze one mode
    ((TrainFlag, CastInBetween), "blocks.1.up_moe", 0, "differs between train and eval mode"),
    # found on the export graph, not on the module's fx trace; it comes after a convertible FFN, so
    # a rewrite that checked as it went would have converted that one before refusing
    ((CastInBetween, OpaqueToFx), "blocks.0.up_moe", 1, "not when torch.fx traces that module alone"),
])
def test_an_ffn_the_rewrite_cannot_reach_is_left_dense_and_the_others_convert(blocks, converted, left, reason, caplog):
    model = Stack(*(block() for block in blocks))
    dense, out, paths = _convert(model)
    assert paths == [converted]
    assert isinstance(model.blocks[left], blocks[left])
    assert reason in caplog.text
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)


def test_when_no_ffn_can_be_rewritten_the_model_is_unchanged():
    model = Stack(OpaqueToFx(), TrainFlag())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        moefx.moefy(model, num_experts=2, example_inputs=(torch.randn(2, 5, 16),))
    except ValueError as err:
        assert "torch.fx traces that module alone" in str(err) and "train and eval" in str(err), err
    else:
        raise AssertionError("moefy converted nothing but raised nothing")
    assert [type(b) for b in model.blocks] == [OpaqueToFx, TrainFlag]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
