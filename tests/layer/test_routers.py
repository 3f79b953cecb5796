import pytest
import torch

import moefx

BASE = dict(d_model=8, d_hidden=16, num_experts=4)


def test_switch_is_top1_with_the_softmax_probability_and_jitter_in_training_only():
    torch.manual_seed(0)
    layer = moefx.MoE(**BASE, top_k=1, gate="switch")
    x = torch.randn(32, 8)
    layer.eval()
    r = layer.router(x)
    probs = torch.softmax(x @ layer.router.weight.T, -1)
    torch.testing.assert_close(r.weights_TK[:, 0], probs.max(-1).values)
    assert torch.equal(r.logits_TE, layer.router(x).logits_TE), "eval routing is deterministic"
    layer.train()
    jittered = layer.router(x).logits_TE
    assert not torch.equal(jittered, r.logits_TE)
    # Multiplicative jitter of at most 1%: logits move by at most 1% of |x|·|w| per term.
    bound = 0.01 * (x.abs() @ layer.router.weight.abs().T)
    assert ((jittered - r.logits_TE).abs() <= bound + 1e-6).all()


def test_gshard_skips_second_choices_at_random_in_training():
    torch.manual_seed(0)
    layer = moefx.MoE(**BASE, top_k=2, gate="gshard")
    x = torch.randn(2000, 8)
    layer.eval()
    r_eval = layer.router(x)
    assert (r_eval.experts_TK < 4).all()
    torch.testing.assert_close(r_eval.weights_TK.sum(-1), torch.ones(2000))
    layer.train()
    torch.manual_seed(5)
    r = layer.router(x)
    skipped = r.experts_TK[:, 1] == 4
    assert (r.experts_TK[:, 0] < 4).all()
    # Second choice kept with probability min(1, 2 * w2): compare the rate with its expectation.
    expected_kept = (2 * r.weights_TK[:, 1]).clamp(max=1).mean()
    assert abs((~skipped).float().mean() - expected_kept) < 0.05
    torch.manual_seed(5)  # the same draws again: the layer skips the same choices
    out = layer(x)
    assert int(layer.stats().dropped) == int(skipped.sum()) and out.shape == x.shape


def test_noisy_topk_adds_noise_in_training_only():
    torch.manual_seed(0)
    layer = moefx.MoE(**BASE, top_k=2, gate="noisy_topk")
    x = torch.randn(16, 8)
    layer.eval()
    clean = layer.router(x)
    torch.testing.assert_close(clean.logits_TE, x @ layer.router.weight.T)
    top = clean.logits_TE.topk(2, -1).values
    torch.testing.assert_close(clean.weights_TK, torch.softmax(top, -1))
    layer.train()
    assert not torch.equal(layer.router(x).logits_TE, clean.logits_TE)
    layer(x).sum().backward()
    assert layer.router.noise_weight.grad is not None


@pytest.mark.parametrize("gate,top_k", [("topk", 2), ("switch", 1), ("gshard", 2), ("noisy_topk", 3), ("sigmoid", 2)])
def test_every_router_trains(gate, top_k):
    torch.manual_seed(0)
    layer = moefx.MoE(**BASE, top_k=top_k, gate=gate, capacity_factor=1.5)
    x = torch.randn(4, 8, 8)
    (layer(x).square().mean() + moefx.aux_loss(layer)).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.in_proj.grad.abs().sum() > 0


def _deepseek_v3_router(layer: moefx.MoE, renormalize: bool):
    """transformers' DeepSeek-V3 router with the layer's weight and bias: the reference."""
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    c = layer.config
    config = DeepseekV3Config(hidden_size=c.d_model, n_routed_experts=c.num_experts, num_experts_per_tok=c.top_k,
                              n_group=c.expert_groups, topk_group=c.topk_groups, norm_topk_prob=renormalize,
                              routed_scaling_factor=1.0)
    reference = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        reference.weight.copy_(layer.router.weight)
        reference.e_score_correction_bias.copy_(layer.router.score_bias)
    return reference


def _by_expert(experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = experts_TK.argsort(dim=-1)
    return experts_TK.gather(1, order), weights_TK.gather(1, order)


@pytest.mark.parametrize("groups,topk_groups,top_k,renormalize", [(1, 1, 2, True), (4, 2, 3, True), (8, 3, 2, False),
                                                                  (2, 1, 4, True)])
def test_sigmoid_router_chooses_and_weighs_like_deepseek_v3(groups, topk_groups, top_k, renormalize):
    torch.manual_seed(0)
    layer = moefx.MoE(d_model=12, d_hidden=8, num_experts=16, top_k=top_k, gate="sigmoid", expert_groups=groups,
                      topk_groups=topk_groups, renormalize=renormalize)
    with torch.no_grad():  # a bias large enough to change choices: the choice must use it, the weights not
        layer.router.score_bias.copy_(torch.randn(16) * 0.3)
    x = torch.randn(200, 12)
    want_logits, want_weights, want_experts = _deepseek_v3_router(layer, renormalize)(x)
    got = layer.router(x)
    got_experts, got_weights = _by_expert(got.experts_TK, got.weights_TK)
    want_experts, want_weights = _by_expert(want_experts, want_weights)
    assert torch.equal(got_experts, want_experts)
    torch.testing.assert_close(got_weights, want_weights)
    torch.testing.assert_close(got.logits_TE, want_logits)
    assert torch.equal(got.counts_E, torch.bincount(got.experts_TK.reshape(-1), minlength=16))
    if topk_groups < groups:  # every token's experts lie in at most topk_groups groups
        per_group = 16 // groups
        assert max(len(set((got.experts_TK[t] // per_group).tolist())) for t in range(200)) <= topk_groups


def test_sigmoid_routers_balance_loss_uses_the_normalised_scores():
    torch.manual_seed(0)
    layer = moefx.MoE(**BASE, top_k=2, gate="sigmoid", load_balance_coef=1.0, z_loss_coef=0.0)
    x = torch.randn(30, 8)
    layer(x)
    scores = torch.sigmoid(x @ layer.router.weight.T)
    probs = scores / scores.sum(-1, keepdim=True)
    counts = layer.stats().routed_per_expert.float()
    want = 4 * (counts / (30 * 2) * probs.mean(0)).sum()
    torch.testing.assert_close(layer.aux_loss(), want)


def test_update_routing_bias_moves_each_expert_against_its_load_since_the_last_update():
    torch.manual_seed(0)
    layer = moefx.MoE(**BASE, top_k=1, gate="sigmoid", bias_update_rate=0.05)
    batches = [torch.randn(40, 8) for _ in range(3)]
    for x in batches:  # three training forwards (gradient accumulation), then one update
        layer(x)
    load = sum(torch.bincount(layer.router(x).experts_TK.reshape(-1), minlength=4) for x in batches).float()
    moefx.update_routing_bias(layer)
    torch.testing.assert_close(layer.router.score_bias, 0.05 * torch.sign(load.mean() - load))
    before = layer.router.score_bias.clone()
    moefx.update_routing_bias(layer)  # no forward since: nothing to balance
    assert torch.equal(layer.router.score_bias, before)
    layer.eval()
    layer(batches[0])  # evaluation forwards do not count
    moefx.update_routing_bias(layer)
    assert torch.equal(layer.router.score_bias, before)


def test_bias_updates_alone_even_out_a_skewed_router():
    """Auxiliary-loss-free balancing: with no gradient step at all, the bias spreads the tokens."""
    torch.manual_seed(0)
    layer = moefx.MoE(d_model=8, d_hidden=16, num_experts=8, top_k=2, gate="sigmoid", bias_update_rate=0.01)
    with torch.no_grad():  # experts 0 and 1 take most tokens
        layer.router.weight[:2] = 1.0
    x = torch.randn(512, 8) + 0.5
    balanced = 512 * 2 / 8
    layer(x)
    assert layer.stats().routed_per_expert.max() > 3 * balanced
    for _ in range(100):
        moefx.update_routing_bias(layer)
        layer(x)
    assert layer.stats().routed_per_expert.max() < 1.25 * balanced, layer.stats().routed_per_expert


def test_the_balancing_bias_stays_fp32_in_a_bf16_model():
    """In bf16 a 0.001 step beside a bias of 0.3 rounds away: the bias keeps fp32 through ``.to``."""
    torch.manual_seed(0)
    layer = moefx.MoE(**BASE, top_k=1, gate="sigmoid", bias_update_rate=0.001).to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.bfloat16 and layer.router.score_bias.dtype == torch.float32
    with torch.no_grad():
        layer.router.score_bias.fill_(0.3)
        layer.router.weight[0] += 5.0  # expert 0 takes every token
    x = torch.randn(64, 8, dtype=torch.bfloat16).abs()
    for _ in range(10):
        layer(x)
        moefx.update_routing_bias(layer)
    torch.testing.assert_close(layer.router.score_bias, torch.tensor([0.29, 0.31, 0.31, 0.31]))
