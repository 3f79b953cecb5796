"""moefx's custom ops (``torch.ops.moefx.*``), registered with ``torch.library`` on import.

Each op file holds one op: its schema, fake (meta) implementation, autograd formula and the
default (CPU) implementation; ``reference.py`` holds slow, obviously-right versions for tests.
Device kernels (Triton on CUDA) register for their dispatch key beside the default.
"""

from moefx.kernels.grouped_linear import grouped_linear
from moefx.kernels.permute import permute
from moefx.kernels.route import route
from moefx.kernels.unpermute import unpermute

__all__ = ["grouped_linear", "permute", "route", "unpermute"]
