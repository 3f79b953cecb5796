"""The layer under torch.compile and torch.export: same numbers, moefx ops as single nodes."""

import torch

import moefx

MOEFX_OPS = {"moefx.route.default", "moefx.permute.default", "moefx.grouped_linear.default", "moefx.unpermute.default"}


def _layer(**options):
    torch.manual_seed(0)
    return moefx.MoE(d_model=16, d_hidden=32, num_experts=4, top_k=2, **options)


def test_compile_matches_eager_forward_and_backward():
    layer = _layer(capacity_factor=1.0, num_shared_experts=1).eval()
    x = torch.randn(24, 16)
    want = layer(x)
    x1 = x.clone().requires_grad_()
    want.sum().backward()
    want_grad = layer.experts.in_proj.grad.clone()
    layer.zero_grad()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(x1)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    torch.testing.assert_close(layer.experts.in_proj.grad, want_grad)
    assert int(layer.stats().tokens_per_expert.sum()) + int(layer.stats().dropped) == 48


def test_inductor_compile_matches_eager():
    layer = _layer().eval()
    x = torch.randn(10, 16)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x))


def test_export_shows_each_moefx_op_as_one_node_and_round_trips(tmp_path):
    layer = _layer(capacity_factor=1.25).eval()
    x = torch.randn(2, 5, 16)
    program = torch.export.export(layer, (x,), strict=False)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert MOEFX_OPS <= set(targets)
    assert sum(t == "moefx.grouped_linear.default" for t in targets) == 2
    torch.testing.assert_close(program.module()(x), layer(x))

    path = tmp_path / "moe.pt2"
    torch.export.save(program, path)
    torch.testing.assert_close(torch.export.load(path).module()(x), layer(x))
