"""Checks and segment bookkeeping shared by the grouped-linear ops.

Legend: S rows (permuted slots), I in features, O out features, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_grouped_weights(op: str, x_NI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor) -> None:
    """``x [rows, in]``, ``weight [E, out, in]``, ``bias [E, out]`` and integer ``offsets [E+1]``."""
    E = weight_EOI.shape[0] if weight_EOI.dim() == 3 else -1
    if x_NI.dim() != 2 or weight_EOI.dim() != 3 or x_NI.shape[1] != weight_EOI.shape[2]:
        raise ValueError(
            f"{op} expects x [rows, in] and weight [experts, out, in], "
            f"got {tuple(x_NI.shape)} and {tuple(weight_EOI.shape)}"
        )
    if bias_EO is not None and bias_EO.shape != weight_EOI.shape[:2]:
        raise ValueError(f"{op}: bias shape {tuple(bias_EO.shape)} must be {tuple(weight_EOI.shape[:2])}")
    if offsets_E1.shape != (E + 1,) or offsets_E1.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{op}: offsets must be an integer tensor of shape ({E + 1},), "
            f"got {offsets_E1.dtype} of shape {tuple(offsets_E1.shape)}"
        )


def expert_segments(op: str, offsets_E1: Tensor, num_rows: int) -> tuple[list[tuple[int, int, int]], int]:
    """(expert, start, end) of every non-empty segment, and the number of kept rows."""
    bounds = offsets_E1.tolist()  # NOTE: device-to-host sync; free on CPU, device kernels avoid it.
    if bounds[0] != 0 or bounds[-1] > num_rows or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"{op}: offsets {bounds} must start at 0, never decrease and end at most at "
            f"the number of rows ({num_rows}); take them from moefx::permute or moefx::plan_dispatch"
        )
    return [(e, a, b) for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a], bounds[-1]


def weight_grad_buffer(weight_EOI: Tensor, segments: list[tuple[int, int, int]]) -> Tensor:
    """A buffer for dW that the per-segment GEMMs overwrite: zeroed only when some expert has no
    rows (its gradient is zero and no GEMM writes it)."""
    return torch.zeros_like(weight_EOI) if len(segments) < weight_EOI.shape[0] else torch.empty_like(weight_EOI)


def largest_segment(segments: list[tuple[int, int, int]]) -> int:
    """Rows of the largest segment: the size of a per-expert scratch buffer reused across experts."""
    return max((b - a for _, a, b in segments), default=0)
