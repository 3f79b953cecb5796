"""A tiny ViT (random weights) over 32x32 images."""

import torch
from transformers import ViTConfig, ViTModel


def build_model():
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4,
    )
    return ViTModel(config, add_pooling_layer=False)


def example_inputs():
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
