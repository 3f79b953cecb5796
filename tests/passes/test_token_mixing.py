"""MLP-Mixer's token mixing: an MLP applied across the sequence axis (transpose, then a Linear over
the sequence length) is not an FFN over tokens and must be rejected with that reason, however the
axes are moved and whatever comes before it; the channel MLP beside it still converts."""

import copy

import pytest
import torch
from torch import nn

import moefx
from moefx.passes.driver import search

S, C = 16, 8  # sequence length, features


def _to_sequence_last(y, how: str):
    if how == "transpose":
        return y.transpose(1, 2)
    if how == "permute":
        return y.permute(0, 2, 1)
    if how == "mT":
        return y.mT
    return y.movedim(1, 2)


class MixerBlock(nn.Module):
    def __init__(self, norm: str, how: str) -> None:
        super().__init__()
        self.norm, self.how = norm, how
        self.ln = nn.LayerNorm(C)
        self.token = nn.Sequential(nn.Linear(S, 32), nn.GELU(), nn.Linear(32, S))
        self.channel = nn.Sequential(nn.Linear(C, 32), nn.GELU(), nn.Linear(32, C))

    def forward(self, x):
        if self.norm == "layer_norm":
            y = self.ln(x)
        elif self.norm == "by_hand":  # an RMS norm written out: pointwise ops and a mean over the last axis
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        else:  # the block's input itself, as the first block of a model fed [batch, sequence, features]
            y = x
        x = x + _to_sequence_last(self.token(_to_sequence_last(y, self.how)), self.how)
        return x + self.channel(x)


class ConvTokenMixer(nn.Module):
    """Token mixing by 1x1 Conv1d over [batch, sequence, features]: the sequence is its channel axis."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(C)
        self.token = nn.Sequential(nn.Conv1d(S, 32, 1), nn.GELU(), nn.Conv1d(32, S, 1))

    def forward(self, x):
        return x + self.token(self.ln(x))


@pytest.mark.parametrize("how", ["transpose", "permute", "mT", "movedim"])
@pytest.mark.parametrize("norm", ["layer_norm", "by_hand", "none"])
def test_token_mixing_mlp_is_rejected_and_the_channel_mlp_converts(norm, how):
    model = MixerBlock(norm, how)
    x = torch.randn(2, S, C)
    found = search(model, (x,))
    assert [m.path for m in found.matches] == ["channel"]
    (rejected,) = [r for r in found.rejected if r.path.startswith("token")]
    assert rejected.reason.startswith("token-mixing MLP"), rejected.reason
    assert "acts across the sequence" in rejected.reason

    dense = copy.deepcopy(model)
    moefx.moefy(model, 4, 2, example_inputs=(x,))
    assert [p for p, _ in moefx.moe_layers(model)] == ["channel"]
    assert isinstance(model.token[0], nn.Linear)  # left dense
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)  # upcycle: exact


def test_token_mixing_by_pointwise_convolution_is_rejected():
    found = search(ConvTokenMixer(), (torch.randn(2, S, C),))
    assert not found.matches
    (rejected,) = found.rejected
    assert rejected.reason.startswith("token-mixing MLP: its 1x1 convolutions read axis 1"), rejected.reason
