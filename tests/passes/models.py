"""Tiny models for the pass tests: transformers architectures (random weights, no downloads) and
models written by hand, each with its example inputs and its true number of FFNs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 97


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[tuple, dict]]
    ffns: int  # the true number of distinct FFNs
    traceable: bool = False  # torch.fx.symbolic_trace works without inputs


def _ids():
    return (torch.randint(0, VOCAB, (2, 7)),), {}


def _llama():
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False,
    ))


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2, use_cache=False))


def _llama_lm_cached():
    """A causal LM as a user builds it: the config's default use_cache=True, so the output holds a
    DynamicCache (which torch.export cannot flatten)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert config.use_cache
    return LlamaForCausalLM(config)


def _gpt2_lm_cached():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    assert config.use_cache
    return GPT2LMHeadModel(config)


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ))


def _t5():
    from transformers import T5Config, T5Model

    return T5Model(T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=2, d_kv=16,
        use_cache=False, feed_forward_proj="gated-gelu",
    ))


def _t5_inputs():
    ids = torch.randint(0, VOCAB, (2, 7))
    return (), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


def _vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ))


class InlineBlock(nn.Module):
    """A block whose FFN is written with F.linear on its own parameters, next to attention-like code."""

    def __init__(self, d: int = 16, h: int = 32) -> None:
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.w_in = nn.Parameter(torch.randn(h, d) / d**0.5)
        self.b_in = nn.Parameter(torch.randn(h) * 0.1)
        self.w_out = nn.Parameter(torch.randn(d, h) / h**0.5)

    def forward(self, x):
        x = x + self.mix(x).softmax(dim=1)
        return x + F.linear(F.gelu(F.linear(self.norm(x), self.w_in, self.b_in)), self.w_out)


class InlineStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([InlineBlock() for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class SharedLayer(nn.Module):
    """ALBERT's layer: a separate up, activation and down, with residual + norm around them."""

    def __init__(self, d: int = 16, h: int = 32) -> None:
        super().__init__()
        self.ffn, self.activation, self.ffn_output = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.ffn_output(self.activation(self.ffn(x))))


class AlbertLike(nn.Module):
    """One layer (and so one FFN) run by every layer of the stack."""

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.layer = SharedLayer()
        self.layers = layers

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(self.layers):
            x = self.layer(x)
        return x


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(F.relu(self.c2(F.relu(self.c1(x)))).mean(dim=(2, 3)))


class PoolFormerBlock(nn.Module):
    """A channels-first (NCHW) block: pooling mixes tokens, an FFN of 1x1 convolutions mixes channels."""

    def __init__(self, c: int = 16, h: int = 32) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(1, c), nn.GroupNorm(1, c)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.mlp = nn.Sequential(nn.Conv2d(c, h, 1), nn.GELU(), nn.Conv2d(h, c, 1))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.pool(y) - y
        return x + self.mlp(self.norm2(x))


def _x():
    return (torch.randn(2, 7, 16),), {}


CASES = [
    Case("llama", _llama, _ids, ffns=2),
    Case("gpt2", _gpt2, _ids, ffns=3),
    Case("llama_lm_cached", _llama_lm_cached, _ids, ffns=2),
    Case("gpt2_lm_cached", _gpt2_lm_cached, _ids, ffns=2),
    Case("bert", _bert, _ids, ffns=2),
    Case("t5", _t5, _t5_inputs, ffns=5),
    Case("vit", _vit, lambda: ((torch.randn(2, 3, 16, 16),), {}), ffns=2),
    Case("sequential", lambda: nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16)), _x, ffns=1, traceable=True),
    Case("inline_f_linear", InlineStack, _x, ffns=3, traceable=True),
    Case("poolformer_like", lambda: nn.Sequential(PoolFormerBlock(), PoolFormerBlock()),
         lambda: ((torch.randn(2, 16, 4, 5),), {}), ffns=2, traceable=True),
    Case("albert_like", AlbertLike, lambda: ((torch.randint(0, VOCAB, (2, 7)),), {}), ffns=1, traceable=True),
]
