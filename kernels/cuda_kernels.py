"""Triton kernels registered for the CUDA dispatch key of the moefx ops, when triton is installed.

Without triton (or on other devices) the ops keep their default implementation, which also runs
on CUDA tensors (one GEMM per expert, after a device-to-host sync of the offsets). The Triton
module is imported on the first CUDA call, so importing moefx never compiles anything.
"""

from __future__ import annotations

import importlib.util

import torch


def register() -> bool:
    """Register the CUDA kernels; False when triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return False

    @torch.library.register_kernel("moefx::grouped_linear", "cuda")
    def _grouped_linear_cuda(x_SI, weight_EOI, bias_EO, offsets_E1):
        from moefx.kernels.triton_grouped_linear import grouped_linear_forward

        return grouped_linear_forward(x_SI, weight_EOI, bias_EO, offsets_E1)

    @torch.library.register_kernel("moefx::grouped_linear_backward", "cuda")
    def _grouped_linear_backward_cuda(grad_y_SO, x_SI, weight_EOI, offsets_E1, need_x, need_weight, need_bias):
        from moefx.kernels.triton_grouped_linear import grouped_linear_backward

        return grouped_linear_backward(grad_y_SO, x_SI, weight_EOI, offsets_E1, need_x, need_weight, need_bias)

    return True
