"""What find_ffns accepts, what it rejects and why, and how it names activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moefx
from moefx.passes.capture import CaptureError, capture
from moefx.passes.driver import search
from tests.passes.models import ConvNet

X = torch.randn(2, 5, 16)


def _matches(model, x=X):
    return moefx.find_ffns(model, (x,))


def _reasons(model, x=X) -> list[str]:
    return [r.reason for r in search(model, (x,)).rejected]


class ManualActivation(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.up, self.down, self.act = nn.Linear(16, 32), nn.Linear(32, 16), act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize(
    "act, name",
    [
        (lambda h: 0.5 * h * (1 + torch.tanh(0.7978845608028654 * (h + 0.044715 * h**3))), "gelu_tanh"),
        (lambda h: h * torch.sigmoid(1.702 * h), "quick_gelu"),
        (lambda h: torch.relu(h) ** 2, "relu2"),
        (lambda h: h * torch.sigmoid(h), "silu"),
        (F.gelu, "gelu"),
        (lambda h: torch.clamp(h, -1, 2) * 3, "elementwise"),
    ],
)
def test_activations_are_named_by_what_they_compute(act, name):
    class Fn(nn.Module):
        def forward(self, h):
            return act(h)

    (match,) = _matches(ManualActivation(Fn()))
    assert match.activation == name


class FusedGLU(nn.Module):
    def __init__(self, gate_first: bool, slicing: bool) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(16, 64, bias=False), nn.Linear(32, 16, bias=False)
        self.gate_first, self.slicing = gate_first, slicing

    def forward(self, x):
        h = self.proj(x)
        a, b = (h[..., :32], h[..., 32:]) if self.slicing else h.chunk(2, dim=-1)
        gate, up = (a, b) if self.gate_first else (b, a)
        return self.out(F.silu(gate) * up)


@pytest.mark.parametrize("gate_first", [True, False])
@pytest.mark.parametrize("slicing", [True, False])
def test_fused_gate_up_in_either_order_converts_exactly(gate_first, slicing):
    model = nn.Sequential(FusedGLU(gate_first, slicing))
    (match,) = _matches(model)
    assert match.path == "0"
    assert (match.kind, match.fused, match.gate_first, match.d_hidden) == ("glu", True, gate_first, 32)
    dense = model(X)
    moefx.moefy(model, 4, 2, example_inputs=(X,))
    torch.testing.assert_close(model(X), dense, rtol=1e-5, atol=1e-6)


class WrittenFFN(nn.Module):
    """An FFN whose projections are written without nn.Linear, each way a linear can be spelled."""

    FORMS = {
        "f.linear(w.t())": lambda x, w: F.linear(x, w.t()),
        "x@w": lambda x, w: x @ w,
        "matmul": lambda x, w: torch.matmul(x, w),
        "einsum": lambda x, w: torch.einsum("bsd,dh->bsh", x, w),
        "einsum(w.t())": lambda x, w: torch.einsum("...d,hd->...h", x, w.t()),
    }

    def __init__(self, form: str) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(16, 32) / 4)  # stored [in, out]
        self.w_out = nn.Parameter(torch.randn(32, 16) / 6)
        self.project = self.FORMS[form]

    def forward(self, x):
        return x + self.project(F.gelu(self.project(x, self.w_in)), self.w_out)


@pytest.mark.parametrize("form", WrittenFFN.FORMS)
def test_every_spelling_of_a_linear_is_one_projection(form):
    model = nn.Sequential(WrittenFFN(form))
    (match,) = _matches(model)
    assert (match.d_model, match.d_hidden, match.activation) == (16, 32, "gelu")
    assert moefx.find_ffns(model) == [match]  # symbolic_trace's graph, without example inputs
    dense = model(X)
    moefx.moefy(model, 4, 2, example_inputs=(X,))
    torch.testing.assert_close(model(X), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "equation, layout",
    [
        ("bsd,dh->bsh", True), ("bsd,hd->bsh", False), ("...d,df->...f", True), ("b s d, h d -> b s h", False),
        ("bsd,dh->bhs", None),  # the output's axes are permuted
        ("bsd,sh->bdh", None),  # contracts the sequence axis: token mixing
        ("bsd,dd->bsd", None), ("bsd,dh,hk->bsk", None), ("bsd,dh", None), ("bsd,bdh->bsh", None),
    ],
)
def test_einsum_is_a_linear_only_when_it_contracts_the_last_axis_into_the_last(equation, layout):
    from moefx.passes.canonicalize import _einsum_weight_layout

    assert _einsum_weight_layout(equation.replace(" ", "")) is layout


class PointwiseConvFFN(nn.Module):
    """PoolFormer's and MobileViTV2's FFN: 1x1 convolutions over NCHW (or NCL) input."""

    def __init__(self, dims: int = 2, gated: bool = False, mid=None) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.fc1, self.fc2 = conv(16, 32, 1), conv(32, 16, 1)
        self.gate = conv(16, 32, 1, bias=False) if gated else None
        self.mid = mid or nn.GELU()

    def forward(self, x):
        h = self.mid(self.fc1(x)) if self.gate is None else F.silu(self.gate(x)) * self.fc1(x)
        return x + self.fc2(h)


class PerChannelScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(32, 1, 1) + 0.5)  # broadcasts over H, W: not over a row

    def forward(self, h):
        return F.gelu(h) * self.scale


@pytest.mark.parametrize("traced", [False, True], ids=["export", "symbolic_trace"])
@pytest.mark.parametrize("dims, gated", [(2, False), (1, False), (2, True)], ids=["conv2d", "conv1d", "conv2d-gated"])
def test_pointwise_conv_ffn_converts_over_the_channel_axis(dims, gated, traced):
    model = nn.Sequential(PointwiseConvFFN(dims, gated))
    x = torch.randn(2, 16, 3, 5) if dims == 2 else torch.randn(2, 16, 7)
    (match,) = moefx.find_ffns(model) if traced else _matches(model, x)
    kind = "glu" if gated else "mlp"
    assert (match.channels_first, match.kind, match.d_model, match.d_hidden) == (True, kind, 16, 32)
    dense = model(x)
    moefx.moefy(model, 4, 2, example_inputs=None if traced else (x,))
    ((_, layer),) = moefx.moe_layers(model)
    assert layer.config.feature_axis == 1
    torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-6)


def test_feature_axis_is_read_from_the_graph_not_taken_as_an_option():
    model = nn.Sequential(PointwiseConvFFN())
    with pytest.raises(ValueError, match="feature_axis is not an option of moefy"):
        moefx.moefy(model, 4, 2, example_inputs=(torch.randn(2, 16, 3, 5),), feature_axis=1)
    assert not list(moefx.moe_layers(model))  # refused before any change


@pytest.mark.parametrize("options,message", [
    (dict(num_experts=1), r"num_experts=1 is invalid: an MoE layer needs an integer >= 2 experts"),
    (dict(activation="relu"), r"activation: not options of moefy; each MoE takes them from the FFN"),
    (dict(d_hidden=8, gated=True), r"d_hidden, gated: not options of moefy"),
])
def test_options_moefy_cannot_take_are_named(options, message):
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    with pytest.raises(ValueError, match=message):
        moefx.moefy(model, **{"num_experts": 4, **options}, example_inputs=(X,))
    assert not list(moefx.moe_layers(model))


def test_pointwise_conv_ffn_with_a_per_channel_parameter_is_refused_with_the_reason():
    model = nn.Sequential(PointwiseConvFFN(mid=PerChannelScale()))
    x = torch.randn(2, 16, 3, 5)
    assert _matches(model, x) == []
    assert any("between its 1x1 convolutions" in r for r in _reasons(model, x)), _reasons(model, x)


class ConvThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(16, 32, 1), nn.Linear(32, 16)  # fc2 reads the last axis: the image's width

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def test_pointwise_conv_then_linear_is_refused_with_the_reason():
    model = nn.Sequential(ConvThenLinear())
    x = torch.randn(2, 16, 3, 32)
    assert _matches(model, x) == []
    assert any("mixes 1x1 convolutions and linears" in r for r in _reasons(model, x)), _reasons(model, x)


def test_spatial_convolution_is_not_a_projection():
    model = nn.Sequential(PointwiseConvFFN())
    model[0].fc1 = nn.Conv2d(16, 32, 3, padding=1)
    assert _matches(model, torch.randn(2, 16, 3, 5)) == []


class AfterConv(nn.Module):
    """An MLP over the last axis of a convolution's NCHW output: that axis is the image's width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(6, 24), nn.GELU(), nn.Linear(24, 6))

    def forward(self, x):
        return self.mlp(self.conv(x))


def test_mlp_over_a_convolutions_width_is_token_mixing():
    x = torch.randn(2, 3, 4, 6)
    assert _matches(AfterConv(), x) == []
    assert any("token-mixing" in r for r in _reasons(AfterConv(), x)), _reasons(AfterConv(), x)


class TokenMixer(nn.Module):
    """MLP-Mixer: a token-mixing MLP (over the sequence axis) and a channel MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.tokens = nn.Sequential(nn.Linear(5, 20), nn.GELU(), nn.Linear(20, 5))
        self.channels = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, x):
        x = x + self.tokens(self.norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm(x))


def test_token_mixing_mlp_is_rejected_and_channel_mlp_kept():
    model = TokenMixer()
    assert [m.path for m in _matches(model)] == ["channels"]
    assert any("token-mixing" in r for r in _reasons(model))


class ChannelsLast(nn.Module):
    """ConvNeXt's block: NCHW conv, permute to NHWC, norm, pointwise linears, permute back."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.pw1, self.act, self.pw2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.pw2(self.act(self.pw1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


def test_channels_last_pointwise_mlp_converts():
    model = ChannelsLast()
    x = torch.randn(2, 8, 4, 4)
    (match,) = _matches(model, x)
    assert (match.d_model, match.d_hidden) == (8, 32)
    dense = model(x)
    moefx.moefy(model, 4, 2, example_inputs=(x,))
    torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-6)


class CastNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32, then cast back with ``type_as`` of its input (the residual)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1 + self.weight.float())).type_as(x)


class GLU(nn.Module):
    def __init__(self, gate_reads_a_copy: bool = False) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)
        self.gate_reads_a_copy = gate_reads_a_copy

    def forward(self, x):
        g = self.gate(x.clone() if self.gate_reads_a_copy else x)
        return self.down(F.silu(g) * self.up(x))


class CastNormBlock(nn.Module):
    """The norm's closing cast feeds the gated MLP (Gemma, Olmo); ``parallel``: attention reads it too (Cohere)."""

    def __init__(self, parallel: bool = False, gate_reads_a_copy: bool = False) -> None:
        super().__init__()
        self.norm, self.mlp = CastNorm(), GLU(gate_reads_a_copy)
        self.mix = nn.Linear(16, 16) if parallel else None

    def forward(self, x):
        h = self.norm(x)
        out = x + self.mlp(h)
        return out if self.mix is None else out + self.mix(h).softmax(dim=1)  # softmax over tokens


@pytest.mark.parametrize(
    "parallel, gate_reads_a_copy", [(False, False), (True, False), (False, True)],
    ids=["cast-reads-the-residual", "cast-also-feeds-attention", "gate-reads-a-copy"],
)
def test_gated_ffn_entry_is_the_nearest_value_both_projections_read(parallel, gate_reads_a_copy):
    model = CastNormBlock(parallel, gate_reads_a_copy)
    assert [(m.path, m.kind) for m in _matches(model)] == [("mlp", "glu")], _reasons(model)
    dense = model(X)
    moefx.moefy(model, 4, 2, example_inputs=(X,))
    torch.testing.assert_close(model(X), dense, rtol=1e-5, atol=1e-6)


class BufferWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w1", torch.randn(32, 16))
        self.register_buffer("w2", torch.randn(16, 32))

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.w1)), self.w2)


class Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


class LeakyIntermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down(h), h.mean()


@pytest.mark.parametrize(
    "model, words",
    [
        (BufferWeights(), "not a parameter"),
        (Projection(), "not d → h → d"),
        (LeakyIntermediate(), "used outside the block"),
    ],
    ids=["buffer-weights", "d-h-c", "intermediate-used-elsewhere"],
)
def test_rejections_say_why(model, words):
    assert _matches(model) == []
    assert any(words in r for r in _reasons(model)), _reasons(model)
    with pytest.raises(moefx.NoFFNFound, match=words):
        moefx.moefy(model, example_inputs=(X,))


def test_attention_output_projection_is_rejected_as_attention():
    layer = nn.Sequential(nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True, dropout=0.0))
    assert [m.path for m in _matches(layer)] == ["0.linear1_moe"]
    rejected = search(layer, (X,)).rejected
    assert [(r.path, "attention projection" in r.reason) for r in rejected] == [("0.self_attn", True)]


def test_conv_net_has_no_ffn():
    with pytest.raises(moefx.NoFFNFound, match="no feed-forward block found in ConvNet"):
        moefx.moefy(ConvNet(), example_inputs=(torch.randn(1, 3, 8, 8),))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic_trace cannot follow it
            return self.mlp(x)
        return x


def test_untraceable_model_without_inputs_names_the_construct_and_the_fix():
    with pytest.raises(CaptureError, match=r"(?s)x.sum\(\) > 0.*pass example_inputs"):
        moefx.find_ffns(Untraceable())


def test_example_inputs_the_model_rejects_are_an_error_not_a_silent_fallback():
    """symbolic_trace ignores the inputs, so falling back to it would record shapes the model never ran."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    with pytest.raises(CaptureError, match=r"Sequential fails on the example inputs.*shapes cannot be multiplied"):
        moefx.moefy(model, example_inputs=(torch.randn(2, 8),))
    assert isinstance(model[0], nn.Linear), "nothing is converted"


@torch.fx.wrap
def _flip_if_negative(x: torch.Tensor) -> torch.Tensor:
    return x if x.sum() > 0 else -x  # data-dependent: export cannot follow it; fx keeps this call whole


class ExportFailsOnly(nn.Module):
    """Runs on its inputs and symbolic_trace sees its FFN, but export fails."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        return _flip_if_negative(self.mlp(x))


def test_when_only_export_fails_the_fallback_is_taken_and_said(caplog):
    captured = capture(ExportFailsOnly(), (X,))
    assert captured.method == "symbolic_trace"
    assert "captured ExportFailsOnly by symbolic_trace" in caplog.text and "export failed" in caplog.text


def test_ffn_written_in_the_root_forward_converts_in_place():
    model = FusedGLU(True, True)
    (match,) = _matches(model)
    assert (match.path, match.placement.how, match.placement.parent) == ("proj_moe", "inline", "")
    dense = model(X)
    assert moefx.moefy(model, 4, 2, example_inputs=(X,)) is model  # tests/passes/test_root_inline.py: more
    torch.testing.assert_close(model(X), dense, rtol=1e-5, atol=1e-6)


def test_include_exclude_every():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(4)])
    assert [m.path for m in moefx.find_ffns(model, (X,))] == ["0", "1", "2", "3"]
    moefx.moefy(model, 4, 2, example_inputs=(X,), exclude=["0", "3*"], every=2)
    assert [p for p, _ in moefx.moe_layers(model)] == ["2"]
    with pytest.raises(ValueError, match="leave none"):
        moefx.moefy(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), example_inputs=(X,), include="x*")
    for bad in (3, [3], {"0": 1}):  # not a glob string or a list of them
        with pytest.raises(TypeError, match="must be a glob string or a list of them"):
            moefx.moefy(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), example_inputs=(X,), include=bad)


def test_meta_device_model_is_found_and_converted_without_memory():
    from transformers import LlamaConfig, LlamaModel

    with torch.device("meta"):
        model = LlamaModel(LlamaConfig(
            vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            use_cache=False,
        ))
    ids = torch.randint(0, 100, (1, 8))
    assert len(moefx.find_ffns(model, (ids,))) == 3
    moefx.moefy(model, 8, 2, example_inputs=(ids,))
    layers = list(moefx.moe_layers(model))
    assert len(layers) == 3 and all(p.is_meta for _, layer in layers for p in layer.parameters())


class NonTensorOutput(nn.Module):
    """Returns an object torch.export cannot flatten next to its tensor, as a KV cache is returned."""
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        return {"out": self.mlp(x), "state": object()}


def test_output_that_export_cannot_flatten_is_captured_and_forward_restored():
    model = NonTensorOutput()
    assert capture(model, (X,)).method == "export"  # not the symbolic_trace fallback
    assert [m.path for m in moefx.find_ffns(model, (X,))] == ["mlp"]
    assert "forward" not in model.__dict__  # the class's forward is the model's forward again
    own = model.forward
    model.forward = lambda x: own(x)  # a forward the user set on the instance is kept
    custom = model.forward
    assert [m.path for m in moefx.find_ffns(model, (X,))] == ["mlp"]
    assert model.__dict__["forward"] is custom


def test_every_names_the_ffns_it_keeps_in_plain_english():
    from moefx.passes.plan import _ordinal

    assert [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 102, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "102nd", "111th"]
