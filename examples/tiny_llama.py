"""A tiny Llama causal LM (random weights) for `moefx convert examples/tiny_llama.py --experts 8`."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 512


def build_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
    )
    return LlamaForCausalLM(config)


def example_inputs():
    return (torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0)),)
