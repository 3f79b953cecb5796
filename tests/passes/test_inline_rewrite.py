"""FFNs written inside a bigger forward (no module of their own): the rewrite re-traces their
module with torch.fx. Those it cannot rewrite there are left dense, with the reason, and the
other FFNs still convert; nothing is changed before every such check has passed."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import moefx


@fx.wrap
def _wrapped_gelu(h: torch.Tensor) -> torch.Tensor:
    """torch.fx keeps a wrapped function as one opaque call; export traces through it."""
    return F.gelu(h)


class Projections(nn.Module):
    """The FFN's two projections; each block below writes its own forward around them."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)


class CastInBetween(Projections):
    """Casts between the projections, written as mixed-precision code does."""

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x).float()).to(x.dtype))


class TrainFlag(Projections):
    def forward(self, x):
        return x + self.down(F.dropout(F.gelu(self.up(x)), 0.1, self.training))


class OpaqueToFx(Projections):
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


class OptionalFeatures(Projections):
    """Adds positional features when given: fx sees a placeholder for `coords`, never a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Linear(2, 16)

    def forward(self, x, coords=None):
        if isinstance(coords, torch.Tensor):
            x = x + self.pos(coords)
        return x + self.down(F.gelu(self.up(x)))


class WithFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.plain = OptionalFeatures(), CastInBetween()

    def forward(self, x, coords):
        return self.plain(self.block(x, coords))


def test_a_trace_that_differs_from_the_forward_is_left_dense_with_the_reason(caplog):
    torch.manual_seed(0)
    model = WithFeatures().eval()
    args = (torch.randn(2, 5, 16), torch.randn(2, 5, 2))
    with torch.no_grad():
        dense = model(*args)
    moefx.moefy(model, num_experts=2, top_k=2, example_inputs=args)
    assert [path for path, _ in moefx.moe_layers(model)] == ["plain.up_moe"]
    assert "trace of block (OptionalFeatures) alone does not reproduce its forward" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(*args), dense, rtol=1e-5, atol=1e-6)


class OptionalMask(Projections):
    def __init__(self) -> None:
        super().__init__()
        self.probe_head = nn.Linear(16, 3)  # used by another method only
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # not read by forward
        self.layer_index = 7

    def forward(self, x, mask=None):
        if mask is not None:
            x = x.masked_fill(mask[..., None], 0.0)
        return x + self.down(F.gelu(self.up(x)))

    def probe(self, x):
        return self.probe_head(x)


def test_the_module_keeps_its_class_attributes_and_the_arguments_it_was_called_with():
    """Traced with a placeholder for `mask`, `mask is not None` would hold and the forward would
    fail on the very inputs it was converted with; the module itself must stay what it was."""
    torch.manual_seed(0)
    model = Stack(OptionalMask()).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        dense = model(x)
    moefx.moefy(model, num_experts=2, top_k=2, example_inputs=(x,))
    block = model.blocks[0]
    assert isinstance(block, OptionalMask) and block.layer_index == 7 and block.probe(x).shape == (2, 5, 3)
    assert sorted(name for name, _ in block.named_children()) == ["probe_head", "up_moe"]  # up and down are experts
    assert "step" in dict(block.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(block(x, mask=None), dense, rtol=1e-5, atol=1e-6)  # called by keyword too
    with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
        block(x, torch.zeros(2, 5, dtype=torch.bool))  # a call the conversion never saw is refused, not wrong
    other = OptionalMask()
    assert type(other).forward is OptionalMask.forward, "only the converted object changed"
    copied = copy.deepcopy(model)  # through the module's __reduce_ex__, as pickle goes
    assert isinstance(copied.blocks[0], OptionalMask) and copied.blocks[0].layer_index == 7
    with torch.no_grad():
        torch.testing.assert_close(copied(x), dense, rtol=1e-5, atol=1e-6)
    unpickled = pickle.loads(pickle.dumps(model))  # in memory: the module's own pickling, not a weights file
    assert isinstance(unpickled.blocks[0], OptionalMask) and unpickled.blocks[0].probe(x).shape == (2, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(unpickled(x), dense, rtol=1e-5, atol=1e-6)


class Sized(Projections):
    """A vision block that takes its feature map's size as integers, and a scale read from self."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 0.5

    def forward(self, x, height, width):
        x = x + x.reshape(x.shape[0], height, width, 16).flip(1).reshape(x.shape)
        return x + self.scale * self.down(F.gelu(self.up(x)))


class SizedStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Sized()

    def forward(self, image):
        n, h, w, d = image.shape
        return self.block(image.reshape(n, h * w, d), h, w)


def test_integer_arguments_stay_arguments_and_plain_attributes_become_read_only():
    torch.manual_seed(0)
    model = SizedStack().eval()
    moefx.moefy(model, num_experts=2, top_k=2, example_inputs=(torch.randn(2, 4, 4, 16),))
    assert [path for path, _ in moefx.moe_layers(model)] == ["block.up_moe"]
    dense = SizedStack().eval()
    dense.load_state_dict({"block.up.weight": model.block.up_moe.experts.in_proj[0], "block.up.bias":
                           model.block.up_moe.experts.in_bias[0], "block.down.weight": model.block.up_moe.experts.out_proj[0],
                           "block.down.bias": model.block.up_moe.experts.out_bias[0]})
    other_size = torch.randn(2, 6, 8, 16)  # not the example's 4 x 4: height and width were not fixed
    with torch.no_grad():
        torch.testing.assert_close(model(other_size), dense(other_size), rtol=1e-5, atol=1e-5)
    assert model.block.scale == 0.5
    with pytest.raises(AttributeError, match="Sized.scale is fixed at 0.5: .*set scale before moefx.moefy"):
        model.block.scale = 1.0  # the graph holds 0.5: a silent no-op otherwise


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = FlagBlock()

    def forward(self, x):
        return self.block(self.block(x, True), False)


class FlagBlock(Projections):
    def forward(self, x, double):
        if double:
            x = 2 * x
        return x + self.down(F.gelu(self.up(x)))


class Probed(OptionalMask):
    def features(self, x):
        return self.up(x)  # would lose `up` to the experts


class InPlaceResidual(Projections):
    def forward(self, x):
        x += self.down(F.gelu(self.up(x)))  # fx traces it out of place: the same output
        return x


@pytest.mark.parametrize("model,converted,reason", [
    (Twice(), [], "is called with different constant arguments"),
    (Stack(Probed(), CastInBetween()), ["blocks.1.up_moe"], "Probed uses self.up outside its forward"),
    (Stack(InPlaceResidual(), CastInBetween()), ["blocks.0.up_moe", "blocks.1.up_moe"], None),
])
def test_what_the_trace_cannot_keep_is_left_dense(model, converted, reason, caplog):
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        dense = model(x.clone())
    try:
        moefx.moefy(model, num_experts=2, top_k=2, example_inputs=(x,))
    except moefx.NoFFNFound as err:
        assert not converted and reason in str(err)
    assert [path for path, _ in moefx.moe_layers(model)] == converted
    assert reason is None or reason in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model(x.clone()), dense, rtol=1e-5, atol=1e-6)


def test_on_the_meta_device_the_trace_is_checked_on_a_random_copy(caplog):
    with torch.device("meta"):
        model = WithFeatures()
    moefx.moefy(model, num_experts=2, top_k=2, example_inputs=(torch.randn(2, 5, 16), torch.randn(2, 5, 2)))
    assert [path for path, _ in moefx.moe_layers(model)] == ["plain.up_moe"]
    assert "trace of block (OptionalFeatures) alone does not reproduce its forward" in caplog.text


class Hooked(OptionalMask):
    """Holds a bound method of itself (a hook): a copy's must be bound to the copy."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.register_forward_hook(self.count)

    def count(self, module, args, output):
        self.seen += 1


def test_a_copy_of_a_rewritten_module_that_refers_to_itself_is_one_object():
    model = Stack(Hooked()).eval()
    moefx.moefy(model, num_experts=2, top_k=2, example_inputs=(torch.randn(2, 5, 16),))
    copied = copy.deepcopy(model)
    hook = next(iter(copied.blocks[0]._forward_hooks.values()))
    assert hook.__self__ is copied.blocks[0]
    seen = copied.blocks[0].seen
    copied(torch.randn(2, 5, 16))
    assert copied.blocks[0].seen == seen + 1
