"""A tiny GPT-2 (random weights): its MLP is Conv1D (transposed weights) around a tanh-GELU."""

import torch
from transformers import GPT2Config, GPT2Model

VOCAB = 512


def build_model():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=96, n_layer=3, n_head=4, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )
    return GPT2Model(config)


def example_inputs():
    return (torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0)),)
