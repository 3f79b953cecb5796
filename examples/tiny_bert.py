"""A tiny BERT (random weights): the FFN spans `intermediate` and `output.dense`; the residual and
LayerNorm in `output` stay dense. Inputs are passed as (args, kwargs)."""

import torch
from transformers import BertConfig, BertModel

VOCAB = 512


def build_model():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertModel(config)


def example_inputs():
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    return (tokens,), {"attention_mask": torch.ones_like(tokens)}
