"""The catalogue of named activations: what each computes, the module moefx builds for it, and
which name a row-wise function answers to.

Every entry has a definition (a function of a tensor); most also have a module, and those names
are the ones an MoE layer accepts (``ACTIVATIONS``, ``make_activation``). The others (``mish``,
``elu``...) are only recognised: an FFN computing one keeps its own ops.

``identify`` names a function by what it computes, not by how it is written: it runs the function
on one probe and compares with each definition, so that GPT-2's tanh formula is ``gelu_tanh`` and
``x * sigmoid(x)`` is ``silu``. The probe and the tolerance are chosen once, here:

- the probe is 641 points on [-8, 8] in float64: wide enough to reach where activations that
  agree near 0 part (``relu6`` caps at 6, the GELUs and SiLU saturate), dense enough (step 0.025)
  to see their bends, and float64 so that the comparison measures the function, not rounding;
- the tolerance is 1e-5, relative (``|f - ref| <= 1e-5 (1 + |ref|)``): float32's working
  precision. A function evaluated in float32 inside (``x.float()``), or written with a truncated
  constant (``0.7978845608`` for sqrt(2/pi)), is within 1e-6 of its definition, while the closest
  two entries, ``gelu`` and ``gelu_tanh``, differ by 5e-4.

The function runs in training mode, so that a dropout among its pieces shows (a dropout is not
the activation it follows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


class ClampedSwiGLU(nn.Module):
    """GPT-OSS's gated activation of the gate and up halves: ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)``
    with ``g = clamp(gate, max=limit)``. Gated only (``takes_gate_and_up``): it is not a function of one input."""

    takes_gate_and_up = True

    def __init__(self, alpha: float = 1.702, limit: float = 7.0) -> None:
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, gate: Tensor, up: Tensor) -> Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


@dataclass(frozen=True)
class Entry:
    """One named activation."""

    computes: Callable[[Tensor], Tensor]  # its definition
    module: Callable[[], nn.Module] | None = None  # the module moefx builds for it; None: recognised only


# In the order ``identify`` tries them (the first that matches names the function).
CATALOGUE: dict[str, Entry] = {
    "identity": Entry(lambda x: x, nn.Identity),
    "relu": Entry(torch.relu, nn.ReLU),
    "relu2": Entry(lambda x: torch.relu(x).square(), SquaredReLU),
    "gelu": Entry(F.gelu, nn.GELU),
    "gelu_tanh": Entry(lambda x: F.gelu(x, approximate="tanh"), lambda: nn.GELU(approximate="tanh")),
    "quick_gelu": Entry(lambda x: x * torch.sigmoid(1.702 * x), QuickGELU),
    "silu": Entry(F.silu, nn.SiLU),
    "sigmoid": Entry(torch.sigmoid, nn.Sigmoid),
    "tanh": Entry(torch.tanh, nn.Tanh),
    "mish": Entry(F.mish),
    "elu": Entry(F.elu),
    "softplus": Entry(F.softplus),
    "leaky_relu": Entry(F.leaky_relu),
    "hardswish": Entry(F.hardswish),
    "relu6": Entry(F.relu6),
}

# The names an MoE layer accepts → the module each builds.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    name: entry.module for name, entry in CATALOGUE.items() if entry.module is not None
}
# Gated-only activations take the gate and up halves (``takes_gate_and_up``), so they have no
# one-input definition to identify by: GPT-OSS's, at its defaults (other values: pass the module).
ACTIVATIONS["clamped_swiglu"] = ClampedSwiGLU

PROBE = torch.linspace(-8.0, 8.0, 641, dtype=torch.float64)
TOLERANCE = 1e-5


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


def identify(fn: Callable[[Tensor], Tensor]) -> str | None:
    """The catalogue name of what ``fn`` computes (on each element of a row), or None when it
    computes none of them (or cannot run on the probe)."""
    out = _on_probe(fn)
    if out is None:
        return None
    return next((name for name, entry in CATALOGUE.items() if _close(out, entry.computes(PROBE))), None)


def computes(fn: Callable[[Tensor], Tensor], name: str) -> bool:
    """Whether ``fn`` computes the catalogue's ``name`` (on the probe, to the tolerance)."""
    out = _on_probe(fn)
    return out is not None and _close(out, CATALOGUE[name].computes(PROBE))


def computes_silu(activation: nn.Module) -> bool:
    """Whether ``activation`` is SiLU: ``nn.SiLU``, or a parameter-free module that computes it
    (transformers' ``SiLUActivation``, an extracted graph). A module with parameters or buffers
    is not: training may move it away from SiLU."""
    if type(activation) is nn.SiLU:
        return True
    if any(True for _ in activation.parameters()) or any(True for _ in activation.buffers()):
        return False
    return computes(activation, "silu")


def _on_probe(fn) -> Tensor | None:
    """``fn`` on the probe, in training mode (every module's mode is put back), in float64; None
    when it fails or does not give one value per element."""
    modules = list(fn.modules()) if isinstance(fn, nn.Module) else []
    modes = {m: m.training for m in modules}  # restored one by one: they may differ
    try:
        if isinstance(fn, nn.Module):
            fn.train()
        with torch.no_grad():
            out = fn(PROBE.clone())
    except Exception:
        return None
    finally:
        for m, training in modes.items():
            m.training = training
    if not isinstance(out, Tensor) or out.shape != PROBE.shape or not out.is_floating_point():
        return None
    return out.to(torch.float64)


def _close(out: Tensor, expected: Tensor) -> bool:
    return bool(torch.all((out - expected).abs() <= TOLERANCE * (1 + expected.abs())))
