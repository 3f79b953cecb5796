"""Named element-wise activations an MoE layer can use between its two linears."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SquaredReLU(nn.Module):
    """relu(x)**2 (Primer)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x).square()


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x) (CLIP)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "relu2": SquaredReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_activation(activation) -> nn.Module:
    """A module for a registered name; a module is used as given, a plain callable is wrapped."""
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str):
        return ACTIVATIONS[activation]()
    return _Lambda(activation)


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)
