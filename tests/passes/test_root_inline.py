"""An FFN written in the forward of the model passed to moefy itself (the root) is converted as an
inline FFN in a submodule is: the root's forward is rewritten and the object keeps its identity."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import moefx
from moefx.passes.record import conversions


class RootFFN(nn.Module):
    """Everything in the root's forward: an FFN over its own Linear modules, another over bare
    parameters (F.linear), a norm and a residual around them."""

    def __init__(self, d: int = 12, h: int = 24) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.w_in = nn.Parameter(torch.randn(h, d) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(d, h) / h ** 0.5)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return x + F.linear(F.silu(F.linear(x, self.w_in)), self.w_out)

    def describe(self) -> str:  # a method of the user's class: it must still be there afterwards
        return f"RootFFN with {self.norm.normalized_shape[0]} features"


def test_an_ffn_in_the_roots_forward_is_converted_in_place():
    torch.manual_seed(0)
    model = RootFFN().double()
    dense = copy.deepcopy(model)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    returned = moefx.moefy(model, num_experts=4, top_k=2, example_inputs=(x,), init="upcycle")
    assert returned is model and isinstance(model, RootFFN) and model.describe() == "RootFFN with 12 features"
    assert [path for path, _ in moefx.moe_layers(model)] == ["fc1_moe", "w_in_moe"]
    assert [(c.path, c.placement) for c in conversions(model)[-1].converted] == [
        ("fc1_moe", "inline"), ("w_in_moe", "inline")]
    assert not hasattr(model, "fc1") and not hasattr(model, "w_in")  # their weights are the experts' now
    torch.testing.assert_close(model(x), dense(x))  # upcycle: exact
    held_out = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(model(held_out), dense(held_out))

    model.train()
    loss = model(x).square().mean() + moefx.aux_loss(model)
    loss.backward()
    for _, layer in moefx.moe_layers(model):
        assert layer.experts.in_proj.grad is not None and layer.router.weight.grad is not None
    assert model.norm.weight.grad is not None


def test_a_root_converted_in_place_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = RootFFN()
    x = torch.randn(2, 3, 12)
    moefx.moefy(model, num_experts=4, top_k=2, example_inputs=(x,), init="drop-upcycle")
    moefx.save(model, tmp_path / "out")
    loaded = moefx.load(tmp_path / "out", model=RootFFN(), example_inputs=(x,))
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    copied = copy.deepcopy(model)
    torch.testing.assert_close(copied(x), model(x))
