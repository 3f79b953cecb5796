"""The CUDA implementation of ``moefx::grouped_linear`` and its backward: the Triton kernels or
``torch._grouped_mm``, whichever is faster for the shape, timed once per shape and cached
(``cuda/tuning.py``'s ``ConfigCache``).

Triton comes first among the candidates: it is what runs where nothing can be timed, and the
only one for biases, sizes ``torch._grouped_mm`` cannot align, and GPUs or dtypes it does not
support (a candidate that fails while being timed is passed over).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from moefx.kernels.cuda import grouped_mm
from moefx.kernels.cuda.tuning import ConfigCache, can_time, rows_bucket
from moefx.kernels.triton import grouped_linear as triton_grouped_linear

BACKENDS = ConfigCache()  # shape key -> "triton" or "grouped_mm"


def forward(x_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor) -> Tensor:
    def run(backend: str) -> Tensor:
        if backend == "grouped_mm":
            return grouped_mm.forward(x_SI, weight_EOI, offsets_E1)
        return triton_grouped_linear.grouped_linear_forward(x_SI, weight_EOI, bias_EO, offsets_E1)

    return run(_choose("forward", x_SI, weight_EOI, bias_EO is not None, run))


def backward(
    grad_y_SO: Tensor, x_SI: Tensor, weight_EOI: Tensor, offsets_E1: Tensor, need_x: bool, need_weight: bool, need_bias: bool
) -> tuple[Tensor, Tensor, Tensor]:
    def run(backend: str) -> tuple[Tensor, Tensor, Tensor]:
        if backend == "grouped_mm":
            return grouped_mm.backward(grad_y_SO, x_SI, weight_EOI, offsets_E1, need_x, need_weight)
        return triton_grouped_linear.grouped_linear_backward(
            grad_y_SO, x_SI, weight_EOI, offsets_E1, need_x, need_weight, need_bias
        )

    return run(_choose(("backward", need_x, need_weight), x_SI, weight_EOI, need_bias, run))


def _choose(kind, x_SI: Tensor, weight_EOI: Tensor, has_bias: bool, run: Callable[[str], object]) -> str:
    candidates = ("triton", "grouped_mm") if grouped_mm.usable(x_SI, weight_EOI, has_bias) else ("triton",)
    # The candidates are part of the key: a call with a bias (Triton only) must not reuse a
    # bias-free call's grouped_mm choice, which would drop its bias.
    key = (kind, tuple(weight_EOI.shape), rows_bucket(x_SI.shape[0]), x_SI.dtype, candidates)
    return BACKENDS.choose(key, candidates, run, can_time(x_SI.device))
