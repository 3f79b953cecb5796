"""gate="expert_choice" (Zhou et al. 2022) against a slow loop written from the definition, in
float64: outputs and every gradient, on the fused local path, the permuted path and, under
torchrun, expert parallelism over 2 ranks (this file is also the torchrun worker).

    torchrun --standalone --nproc_per_node 2 tests/layer/test_expert_choice.py
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moefx
from moefx.layer.config import GATES, InvalidOption

ROOT = Path(__file__).resolve().parents[2]
D, H = 8, 12


def reference_expert_choice(layer, x_TD):
    """Each expert, in turn, takes its C best-scoring tokens (ties: the lower token index)."""
    c, ex = layer.config, layer.experts
    T, E = x_TD.shape[0], c.num_experts
    scores = torch.softmax(F.linear(x_TD, layer.router.weight), dim=-1)
    C = min(math.ceil(c.capacity_factor * T * c.top_k / E), T)
    out = [torch.zeros(c.d_model, dtype=x_TD.dtype) for _ in range(T)]
    for e in range(E):
        ranked = sorted(range(T), key=lambda t: (-scores[t, e].item(), t))
        for t in ranked[:C]:
            h = F.linear(x_TD[t], ex.in_proj[e], None if ex.in_bias is None else ex.in_bias[e])
            h = F.silu(h[:H]) * h[H:]
            y = F.linear(h, ex.out_proj[e], None if ex.out_bias is None else ex.out_bias[e])
            out[t] = out[t] + scores[t, e] * y
    return torch.stack(out)


def _layer(num_experts: int, top_k: int, capacity_factor, seed: int = 0) -> moefx.MoE:
    torch.manual_seed(seed)
    return moefx.MoE(d_model=D, d_hidden=H, num_experts=num_experts, top_k=top_k, gate="expert_choice",
                     capacity_factor=capacity_factor, bias=True, dtype=torch.float64)


def _grads(layer, x, g, forward):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    y = forward(x)
    (y * g).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "permuted"])
@pytest.mark.parametrize("num_experts,top_k,capacity_factor,tokens", [
    (4, 2, None, 10),  # default factor 1.0: C = ceil(10*2/4) = 5
    (4, 1, 1.5, 7),  # C = ceil(7*1.5/4) = 3
    (3, 3, 2.0, 5),  # C = ceil(5*2*3/3) = 10 > T: every expert takes every token
    (6, 2, 0.3, 9),  # C = 1
])
def test_layer_equals_the_loop_reference(fused, num_experts, top_k, capacity_factor, tokens):
    layer = _layer(num_experts, top_k, capacity_factor)
    layer.fused_experts = fused
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, D, generator=gen, dtype=torch.float64)
    g = torch.randn(tokens, D, generator=gen, dtype=torch.float64)
    got = _grads(layer, x, g, layer)
    want = _grads(layer, x, g, lambda x: reference_expert_choice(layer, x))
    assert len(got) == len(want) == 2 + len(list(layer.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    counts = layer.stats().tokens_per_expert
    assert counts.tolist() == [min(math.ceil(layer.config.capacity_factor * tokens * top_k / num_experts), tokens)] * num_experts


def test_compiled_and_exported_layer_equals_eager():
    layer = _layer(4, 2, None)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = layer(x)
    torch.testing.assert_close(torch.compile(layer)(x), want)
    torch.testing.assert_close(torch.export.export(layer, (x,)).module()(x), want)


def test_a_token_can_be_taken_by_no_expert_or_by_several():
    layer = _layer(4, 1, 1.0)
    with torch.no_grad():  # every expert prefers the tokens with a large first feature
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = torch.tensor([1.0, 1.0, -1.0, -1.0])
    x = torch.zeros(8, D, dtype=torch.float64)
    x[:, 0] = torch.arange(8, dtype=torch.float64)
    routing = layer.router(x)
    taken_T = (routing.experts_TK < 4).sum(dim=1)
    assert taken_T.tolist() == [2, 2, 0, 0, 0, 0, 2, 2]  # C = ceil(8 * 1 / 4) = 2 tokens per expert


def test_config_defaults_and_refusals():
    assert "expert_choice" in GATES  # the CLI's --gate choices come from GATES
    config = moefx.MoEConfig(d_model=4, d_hidden=4, num_experts=4, gate="expert_choice")
    assert config.capacity_factor == 1.0 and config.renormalize is False
    with pytest.raises(InvalidOption, match="renormalize"):
        moefx.MoEConfig(d_model=4, d_hidden=4, num_experts=4, gate="expert_choice", renormalize=True)


def test_cli_accepts_the_gate():
    from moefx.cli.main import build_parser

    args = build_parser().parse_args(["convert", "model.py", "--gate", "expert_choice", "-o", "out"])
    assert args.gate == "expert_choice"


def test_moefy_refuses_a_model_that_generates_and_converts_an_encoder():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match="expert_choice.*not causal"):
        moefx.moefy(gpt2, num_experts=4, gate="expert_choice", example_inputs=(ids,))
    assert next(moefx.moe_layers(gpt2), None) is None
    assert all(torch.equal(v, before[k]) for k, v in gpt2.state_dict().items())

    from transformers import LlamaConfig, LlamaModel  # no head, no generate: causal attention all the same

    llama = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="LlamaAttention is causal"):
        moefx.moefy(llama, num_experts=4, gate="expert_choice", example_inputs=(ids,))
    assert next(moefx.moe_layers(llama), None) is None

    bert = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))
    moefx.moefy(bert, num_experts=4, gate="expert_choice", example_inputs=(ids,))
    layers = list(moefx.moe_layers(bert))
    assert layers and all(layer.config.gate == "expert_choice" for _, layer in layers)
    assert bert(ids).last_hidden_state.shape == (2, 8, 16)


def test_expert_parallel_equals_the_single_process_layer():
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert done.stdout.count("expert_choice ep ok") == 2, done.stdout


def _expert_parallel_worker() -> None:
    """Each rank routes its own batch (expert choice ranks the batch it is given): the EP layer's
    output, input and router gradients equal the single-process layer's on that batch; the expert
    gradients, the mean over the ranks' batches (parallelize's convention: the loss is the ranks' mean)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layer = _layer(4, 2, None)
    reference = copy.deepcopy(layer)
    moefx.parallelize(layer, moefx.expert_parallel_mesh(ep_size=world), data_parallel=False)

    def batch(r):
        gen = torch.Generator().manual_seed(10 + r)
        return torch.randn(9, D, generator=gen, dtype=torch.float64), torch.randn(9, D, generator=gen, dtype=torch.float64)

    x, g = batch(rank)
    got = _grads(layer, x, g, layer)
    per_rank = [_grads(reference, *batch(r), lambda x: reference_expert_choice(reference, x)) for r in range(world)]
    want = per_rank[rank][:2]
    names = [n for n, _ in reference.named_parameters()]
    summed = [sum(grads[2 + i] for grads in per_rank) for i in range(len(names))]
    local = layer.experts.in_proj.shape[0]
    for i, name in enumerate(names):
        expert = name.startswith("experts.")  # this rank's shard of the experts
        want.append(summed[i][rank * local:(rank + 1) * local] / world if expert else per_rank[rank][2 + i])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    print(f"rank {rank}: expert_choice ep ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _expert_parallel_worker()
