import pytest
import torch

import moefx
from tests.layer.reference_moe import reference_moe

CONFIGS = {
    "switch-eval": dict(num_experts=4, top_k=1, gate="switch"),
    "gshard-eval-capacity": dict(num_experts=4, top_k=2, gate="gshard", capacity_factor=0.75),
    "noisy-topk-eval": dict(num_experts=5, top_k=3, gate="noisy_topk"),
    "gated-k2": dict(num_experts=4, top_k=2),
    "plain-gelu-bias-k1": dict(num_experts=5, top_k=1, gated=False, activation="gelu", bias=True),
    "k4-no-renorm": dict(num_experts=6, top_k=4, renormalize=False),
    "softmax-after-topk": dict(num_experts=4, top_k=2, softmax_first=False),
    "capacity-0.5": dict(num_experts=4, top_k=2, capacity_factor=0.5),
    "capacity-1.0-bias": dict(num_experts=3, top_k=2, capacity_factor=1.0, bias=True),
    "shared-experts-scaled": dict(num_experts=4, top_k=2, num_shared_experts=1, routed_scale=2.5),
}


def _layer(**options):
    torch.manual_seed(0)
    return moefx.MoE(d_model=6, d_hidden=10, dtype=torch.float64, **options).eval()


@pytest.mark.parametrize("path", ["fused", "permuted"])
@pytest.mark.parametrize("name", CONFIGS)
def test_layer_matches_slow_loop_outputs_and_all_gradients(name, path):
    """Both forms of the layer: a local layer runs the fused ops; the permuted path is what
    expert parallelism and offloaded experts run."""
    layer = _layer(**CONFIGS[name])
    layer.fused_experts = path == "fused"
    # Large router weights spread tokens unevenly, so capacity bites and some experts may idle.
    with torch.no_grad():
        layer.router.weight.mul_(4)
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref_x = x.detach().clone().requires_grad_()
    ref_out, kept = reference_moe(layer, ref_x)
    torch.testing.assert_close(out, ref_out)
    assert int(layer.stats().dropped) == x[..., 0].numel() * layer.config.top_k - len(kept)

    grad = torch.randn_like(out)
    # allow_unused: the noisy router's noise weight takes no part in eval.
    got = torch.autograd.grad(out, [x, *layer.parameters()], grad, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref_out, [ref_x, *layer.parameters()], grad, allow_unused=True, materialize_grads=True)
    names = ["input", *[n for n, _ in layer.named_parameters()]]
    for n, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, msg=lambda m, n=n: f"gradient of {n}: {m}")


def test_capacity_drops_exactly_the_defined_choices():
    """Capacity ceil(0.5 * 8 tokens * 1 / 2 experts) = 2: all tokens prefer expert 0, so exactly
    tokens 0 and 1 keep it and tokens 2..7 contribute zero."""
    layer = moefx.MoE(d_model=4, d_hidden=8, num_experts=2, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0
    x = torch.randn(8, 4).abs() + 0.1  # positive first feature: every token picks expert 0
    out = layer(x)
    assert layer.stats().as_dict() == {"tokens_per_expert": [2, 0], "routed_per_expert": [8, 0], "dropped": 6}
    assert out[:2].abs().sum() > 0
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


def test_stats_count_every_choice_without_capacity():
    layer = moefx.MoE(d_model=8, d_hidden=16, num_experts=4, top_k=2)
    layer(torch.randn(2, 9, 8))
    stats = layer.stats()
    assert isinstance(stats.tokens_per_expert, torch.Tensor)
    assert torch.equal(stats.tokens_per_expert, stats.routed_per_expert)
    assert int(stats.tokens_per_expert.sum()) == 2 * 9 * 2 and int(stats.dropped) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_backward_close_to_fp32(dtype):
    torch.manual_seed(0)
    layer = moefx.MoE(d_model=32, d_hidden=64, num_experts=4, top_k=2)
    x = torch.randn(64, 32)
    want = layer(x)
    low = layer.to(dtype)
    x_low = x.to(dtype).requires_grad_()
    got = low(x_low)
    assert got.dtype == dtype
    assert low.router(x_low).weights_TK.dtype == torch.float32, "router math must stay fp32"
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    grad = torch.randn_like(want)
    got.backward(grad.to(dtype))
    assert x_low.grad.dtype == dtype and low.experts.in_proj.grad.dtype == dtype
    low_grads = [x_low.grad, low.experts.in_proj.grad, low.router.weight.grad]
    layer32 = layer.to(torch.float32)
    layer32.zero_grad()
    x32 = x.clone().requires_grad_()
    layer32(x32).backward(grad)
    for g_low, g32 in zip(low_grads, [x32.grad, layer32.experts.in_proj.grad, layer32.router.weight.grad]):
        torch.testing.assert_close(g_low.float(), g32, rtol=5e-2, atol=5e-2 * g32.abs().max().item())


def test_empty_batch_gives_empty_output_and_zero_losses():
    layer = moefx.MoE(d_model=8, d_hidden=16, num_experts=4, top_k=2, capacity_factor=1.0)
    out = layer(torch.randn(0, 5, 8))
    assert out.shape == (0, 5, 8)
    assert float(moefx.aux_loss(layer)) == 0.0
    assert int(layer.stats().dropped) == 0


def test_input_dtype_must_match_the_layer():
    layer = moefx.MoE(d_model=8, d_hidden=16, num_experts=2, top_k=1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"torch.float32.*torch.bfloat16"):
        layer(torch.randn(3, 8))


def test_wrong_last_dimension_names_both_shapes():
    layer = moefx.MoE(d_model=8, d_hidden=16, num_experts=2, top_k=1)
    with pytest.raises(ValueError, match=r"\(2, 3, 7\).*\(\.\.\., 8\)"):
        layer(torch.randn(2, 3, 7))


def test_channels_first_layer_routes_each_position_like_the_features_last_layer():
    torch.manual_seed(0)
    last = moefx.MoE(d_model=8, d_hidden=16, num_experts=4, top_k=2, dtype=torch.float64)
    first = moefx.MoE(d_model=8, d_hidden=16, num_experts=4, top_k=2, dtype=torch.float64, feature_axis=1)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)  # N, D, H, W
    y = first(x)
    torch.testing.assert_close(y, last(x.movedim(1, -1)).movedim(-1, 1), rtol=0, atol=0)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(2, 3, 8\).*dimension 1.*\(N, 8, \.\.\.\)"):
        first(torch.randn(2, 3, 8, dtype=torch.float64))


def test_aux_loss_is_the_weighted_sum_of_both_losses_and_differentiable():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        moefx.MoE(d_model=8, d_hidden=16, num_experts=4, top_k=2, load_balance_coef=0.1, z_loss_coef=0.01),
        moefx.MoE(d_model=8, d_hidden=16, num_experts=4, top_k=1, load_balance_coef=0.2, z_loss_coef=0.0),
    )
    x = torch.randn(10, 8)
    model(x)
    total = moefx.aux_loss(model)
    assert total.dim() == 0

    expected = 0.0
    h = x
    for layer in model:
        logits = h @ layer.router.weight.T
        probs = torch.softmax(logits, -1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(layer.config.top_k, -1).indices, 1.0)
        balance = 4 * (chosen.mean(0) / layer.config.top_k * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        expected = expected + layer.config.load_balance_coef * balance + layer.config.z_loss_coef * z
        h = layer(h)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert model[0].router.weight.grad.abs().sum() > 0


def test_aux_loss_before_any_forward_is_zero():
    assert float(moefx.aux_loss(moefx.MoE(d_model=4, d_hidden=8, num_experts=2, top_k=1))) == 0.0


def test_moe_layers_lists_a_shared_layer_once():
    shared = moefx.MoE(d_model=4, d_hidden=8, num_experts=2, top_k=1)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared), "c": torch.nn.Linear(4, 4)})
    assert [name for name, _ in moefx.moe_layers(model)] == ["a"]


def test_shared_experts_add_a_dense_ffn():
    layer = _layer(num_experts=4, top_k=2, num_shared_experts=2)
    x = torch.randn(5, 6, dtype=torch.float64)
    shared_out = layer.shared_experts(x)
    layer.shared_experts = None
    routed_out = layer(x)
    layer_with = _layer(num_experts=4, top_k=2, num_shared_experts=2)
    torch.testing.assert_close(layer_with(x), routed_out + shared_out)
    assert layer_with.shared_experts.out_proj.in_features == 2 * 10


def test_gated_silu_runs_as_one_swiglu_op_whatever_module_computes_it():
    from transformers.activations import SiLUActivation

    from moefx.layer.activations import computes_silu

    assert computes_silu(torch.nn.SiLU()) and computes_silu(SiLUActivation())
    assert computes_silu(torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Identity()))
    assert not computes_silu(torch.nn.GELU())
    mixed = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Dropout(0.1).eval())  # a fresh container around eval pieces
    assert not computes_silu(mixed), "dropout counts in training"
    assert mixed.training and not mixed[1].training, "the probe leaves every module's mode as it was"
    assert not computes_silu(torch.nn.Sequential(torch.nn.SiLU(), torch.nn.LayerNorm(4))), "a module with weights is not SiLU"
    layer = moefx.MoE(d_model=6, d_hidden=10, num_experts=4, top_k=2, activation=SiLUActivation(), dtype=torch.float64)
    generic = moefx.MoE(d_model=6, d_hidden=10, num_experts=4, top_k=2, activation="silu", dtype=torch.float64)
    generic.load_state_dict(layer.state_dict())
    generic.experts.mid.swiglu = False  # the same math through separate ops
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    program = torch.export.export(layer.eval(), (x,), strict=False)
    assert "moefx.swiglu.default" in {str(n.target) for n in program.graph.nodes}
    out, want = layer(x), generic(x)
    torch.testing.assert_close(out, want)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    expected = torch.autograd.grad(want, [x, *generic.parameters()], grad)
    for g, w in zip(got, expected):
        torch.testing.assert_close(g, w)


def test_deepcopy_after_a_training_step_copies_the_layer_without_its_last_forward():
    import copy

    layer = _layer(num_experts=4, top_k=2).train()
    x = torch.randn(5, 6, dtype=torch.float64)
    layer(x).sum().backward()  # the layer now holds routing with autograd history
    twin = copy.deepcopy(layer)
    assert twin._last_routing is None and layer._last_routing is not None
    torch.testing.assert_close(twin(x), layer(x))
    assert twin.experts.in_proj is not layer.experts.in_proj
