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


@pytest.mark.parametrize("gate,top_k", [("topk", 2), ("switch", 1), ("gshard", 2), ("noisy_topk", 3)])
def test_every_router_trains(gate, top_k):
    torch.manual_seed(0)
    layer = moefx.MoE(**BASE, top_k=top_k, gate=gate, capacity_factor=1.5)
    x = torch.randn(4, 8, 8)
    (layer(x).square().mean() + moefx.aux_loss(layer)).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.in_proj.grad.abs().sum() > 0
