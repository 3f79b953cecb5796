"""moefx's custom ops (``torch.ops.moefx.*``), registered with ``torch.library`` on import.

Each op module holds one op: its schema, fake (meta) implementation, autograd formula and the
default (CPU) implementation; ``reference.py`` holds slow, obviously-right versions for tests.
Device kernels (Triton on CUDA) register for their dispatch key beside the default. Call the ops
through ``torch.ops.moefx``: route, permute, grouped_linear, unpermute, all_to_all (expert parallelism).
"""

from moefx.kernels import all_to_all, grouped_linear, permute, route, unpermute  # noqa: F401  (registers the ops)
from moefx.kernels import cuda_kernels

cuda_kernels.register()
