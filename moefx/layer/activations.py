"""Named element-wise activations an MoE layer can use between its two linears."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def computes_silu(activation: nn.Module) -> bool:
    """Whether ``activation`` is SiLU: ``nn.SiLU``, or a parameter-free module that computes it
    (transformers' ``SiLUActivation``, an extracted graph), checked on a probe in float64 in
    training mode (a dropout among the pieces makes it not SiLU)."""
    if type(activation) is nn.SiLU:
        return True
    if any(True for _ in activation.parameters()) or any(True for _ in activation.buffers()):
        return False
    probe = torch.linspace(-8, 8, 161, dtype=torch.float64)
    modes = {m: m.training for m in activation.modules()}  # restored one by one: they may differ
    try:  # in training mode, so that a dropout among the pieces shows
        with torch.no_grad():
            out = activation.train()(probe)
    except Exception:  # noqa: BLE001  (an activation that cannot run on the probe is simply not SiLU)
        return False
    finally:
        for m, training in modes.items():
            m.training = training
    return isinstance(out, Tensor) and out.shape == probe.shape and torch.allclose(out, F.silu(probe), rtol=1e-12, atol=1e-12)
