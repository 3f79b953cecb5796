"""A converted model is a normal module: state_dict, save/load, .to(), torch.export, torch.compile, DDP."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import moefx
from tests.passes.models import CASES

_BY_NAME = {c.name: c for c in CASES}


def _converted(name: str):
    torch.manual_seed(0)
    case = _BY_NAME[name]
    model = case.build().eval()
    args, kwargs = case.inputs()
    moefx.moefy(model, 4, 2, example_inputs=args, example_kwargs=kwargs)
    return case, model, args, kwargs


def _out(result):
    return result if isinstance(result, torch.Tensor) else result[0]


@pytest.mark.parametrize("name", ["llama", "inline_f_linear", "albert_like"])
def test_state_dict_round_trips_through_safetensors(name, tmp_path):
    case, model, args, kwargs = _converted(name)
    expected = _out(model(*args, **kwargs))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    torch.manual_seed(1)
    fresh = case.build().eval()
    moefx.moefy(fresh, 4, 2, example_inputs=args, example_kwargs=kwargs)
    assert not torch.equal(_out(fresh(*args, **kwargs)), expected)  # a different init before loading
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(_out(fresh(*args, **kwargs)), expected)


@pytest.mark.parametrize("name", ["inline_f_linear", "poolformer_like"])
def test_to_dtype_and_export_keep_working(name):
    _, model, args, kwargs = _converted(name)
    model.double()
    x = args[0].double()
    expected = model(x)
    program = torch.export.export(model, (x,), strict=False)
    targets = {str(n.target) for n in program.graph.nodes}
    assert {"moefx.route.default", "moefx.gather_grouped_linear.default", "moefx.grouped_linear_combine.default"} <= targets
    torch.testing.assert_close(program.module()(x), expected)


def test_exported_program_saves_and_loads(tmp_path):
    _, model, args, kwargs = _converted("llama")
    model.eval()
    program = torch.export.export(model, args, kwargs, strict=False)
    ops = [str(n.target) for n in program.graph.nodes if str(n.target).startswith("moefx.")]
    assert ops.count("moefx.route.default") == 2 and ops.count("moefx.grouped_linear_combine.default") == 2  # 2 layers
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(*args, **kwargs)[0], model(*args, **kwargs)[0])


def test_torch_compile_matches_eager():
    _, model, args, _ = _converted("albert_like")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(*args), model(*args))


def test_ddp_trains_a_converted_model():
    _, model, args, _ = _converted("llama")
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(store, 'store')}", rank=0, world_size=1)
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(model.train())
            loss = ddp(*args).last_hidden_state.square().mean() + moefx.aux_loss(model)
            loss.backward()
            grads = [p.grad for _, layer in moefx.moe_layers(model) for p in layer.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("name", ["bert", "inline_f_linear", "poolformer_like"])  # fold, inline, swap (1x1 conv)
@pytest.mark.parametrize("mode", [False, True])
def test_new_modules_take_the_train_or_eval_mode_of_the_model(name, mode):
    """GShard keeps its second expert at random in training only: a model converted in eval mode
    that left its MoE layers in training would differ from the dense model, and from call to call."""
    torch.manual_seed(0)
    case = _BY_NAME[name]
    model = case.build().train(mode)
    args, kwargs = case.inputs()
    with torch.no_grad():
        dense = _out(model(*args, **kwargs)) if not mode else None
    moefx.moefy(model, 4, 2, gate="gshard", example_inputs=args, example_kwargs=kwargs)
    assert {m.training for m in model.modules()} == {mode}
    if not mode:  # upcycled, renormalised top-2 of copies: the dense model's output
        with torch.no_grad():
            torch.testing.assert_close(_out(model(*args, **kwargs)), dense, rtol=1e-5, atol=1e-5)
