"""Tiny transformers checkpoints written by ``save_pretrained``, and the in-memory reference: the same
dense model loaded whole and converted by ``moefx.moefy``."""

from __future__ import annotations

from pathlib import Path

import torch

import moefx

VOCAB = 96


def llama_config(tied: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=tied)


def qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=False)


def save_dense(directory: Path, config=None, *, max_shard_size=None, dtype=torch.float32) -> Path:
    """A dense causal LM with random weights, saved with ``save_pretrained`` (sharded if asked)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config or llama_config()).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return directory


def in_memory(directory: Path, **options):
    """The reference: the checkpoint loaded whole and converted in memory with ``options``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    moefx.moefy(model, example_inputs=(tokens(),), **options)
    return model


def tokens(batch: int = 2, seq_len: int = 12):
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(1))


def logits(model, ids=None):
    with torch.no_grad():
        return model(tokens() if ids is None else ids).logits
