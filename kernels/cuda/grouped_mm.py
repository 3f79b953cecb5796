"""``moefx::grouped_linear`` and its backward through ``torch._grouped_mm`` (PyTorch's grouped GEMM,
CUTLASS on recent NVIDIA GPUs): one of the backends ``cuda/backends.py`` chooses from.

Legend: S rows, I in features, O out features, E experts.

``torch._grouped_mm`` takes the segment ends as int32 offsets and leaves the rows past the last
end unspecified, so those (dropped) rows are zeroed here; it has no per-group bias, so this
backend serves bias-free experts only (``usable``). Strides must be multiples of 16 bytes. No
device-to-host sync: every size comes from shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def usable(x_SI: Tensor, weight_EOI: Tensor, has_bias: bool) -> bool:
    """Whether this backend can compute the op for these operands at all."""
    aligned = all((n * x_SI.element_size()) % 16 == 0 for n in (weight_EOI.shape[1], weight_EOI.shape[2]))
    return hasattr(torch, "_grouped_mm") and not has_bias and x_SI.dtype == weight_EOI.dtype and aligned


def _ends(offsets_E1: Tensor) -> Tensor:
    return offsets_E1[1:].to(torch.int32)


def _zero_dropped(y_SN: Tensor, offsets_E1: Tensor) -> Tensor:
    kept_S1 = (torch.arange(y_SN.shape[0], device=y_SN.device) < offsets_E1[-1])[:, None]
    return torch.where(kept_S1, y_SN, 0)  # where, not a product: the unspecified rows may hold NaN


def forward(x_SI: Tensor, weight_EOI: Tensor, offsets_E1: Tensor) -> Tensor:
    return _zero_dropped(torch._grouped_mm(x_SI, weight_EOI.transpose(1, 2), offs=_ends(offsets_E1)), offsets_E1)


def backward(
    grad_y_SO: Tensor, x_SI: Tensor, weight_EOI: Tensor, offsets_E1: Tensor, need_x: bool, need_weight: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x_SI, grad_weight_EOI, empty)`` like the op's backward; experts without rows get zero dW."""
    ends = _ends(offsets_E1)
    grad_x, grad_w = x_SI.new_empty(0), weight_EOI.new_empty(0)
    if need_x:
        grad_x = _zero_dropped(torch._grouped_mm(grad_y_SO, weight_EOI, offs=ends), offsets_E1)
    if need_weight:  # the rows past the last end take no part
        grad_w = torch._grouped_mm(grad_y_SO.t(), x_SI, offs=ends)
    return grad_x, grad_w, weight_EOI.new_empty(0)
