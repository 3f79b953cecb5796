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

    @torch.library.register_kernel("moefx::route", "cuda")
    def _route_cuda(logits_TE, top_k, renormalize, softmax_first):
        if logits_TE.dtype == torch.float64:  # the kernel computes in fp32; fp64 keeps its precision
            from moefx.kernels.route import route_with_torch

            return route_with_torch(logits_TE, top_k, renormalize, softmax_first)
        from moefx.kernels.triton_route import route

        return route(logits_TE, top_k, renormalize, softmax_first)

    return True
