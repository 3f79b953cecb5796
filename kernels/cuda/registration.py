"""Kernels registered for the CUDA dispatch key of the moefx ops, when triton is installed: Triton
kernels, and for the permuted grouped linear a per-shape choice between them and
``torch._grouped_mm`` (``cuda/backends.py``).

Without triton (or on other devices) the ops keep their default implementation, which also runs
on CUDA tensors (one GEMM per expert, after a device-to-host sync of the offsets). The Triton
modules are imported on the first CUDA call, so importing moefx never compiles anything.
``default_kernels()`` switches these kernels off for a while: the benchmark's "reference ops".
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from moefx.kernels.ops import gather_grouped_linear, grouped_linear, grouped_linear_combine, route

# op -> (module under moefx.kernels, function): the function takes the op's arguments and returns its outputs.
CUDA_KERNELS: dict[torch.library.CustomOpDef, tuple[str, str]] = {
    grouped_linear.grouped_linear: ("cuda.backends", "forward"),  # Triton or torch._grouped_mm
    grouped_linear.grouped_linear_backward: ("cuda.backends", "backward"),
    gather_grouped_linear.gather_grouped_linear: ("triton.fused_linear", "gather_grouped_linear_forward"),
    gather_grouped_linear.gather_grouped_linear_backward: ("triton.fused_linear", "gather_grouped_linear_backward"),
    grouped_linear_combine.grouped_linear_combine: ("triton.fused_linear", "grouped_linear_combine_forward"),
    grouped_linear_combine.grouped_linear_combine_backward: ("triton.fused_linear", "grouped_linear_combine_backward"),
    route.route: ("triton.route", "route"),
}


def _triton_unless_fp64(op: torch.library.CustomOpDef, device_type: str, module: str, function: str):
    """The op's Triton kernel; with an fp64 tensor among the arguments (a gradcheck, say) the op's
    default implementation instead, since the kernels compute in fp32 (and do not compile for fp64)."""
    def run(*args):
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            with op.set_kernel_enabled(device_type, enabled=False):
                return op(*args)
        return getattr(importlib.import_module(f"moefx.kernels.{module}"), function)(*args)

    return run


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def register(device_type: str = "cuda") -> bool:
    """Register the Triton kernels for ``device_type``; False when triton is not installed.
    (Tests register them for "cpu" in a child process, where the interpreter runs them.)"""
    if not has_triton():
        return False
    for op, (module, function) in CUDA_KERNELS.items():
        op.register_kernel(device_type)(_triton_unless_fp64(op, device_type, module, function))
    return True


@contextmanager
def default_kernels(device_type: str = "cuda") -> Iterator[None]:
    """Within the block, tensors on ``device_type`` run the ops' default PyTorch implementations,
    not Triton."""
    with ExitStack() as stack:
        if has_triton():  # otherwise nothing is registered, and the defaults run anyway
            for op in CUDA_KERNELS:
                stack.enter_context(op.set_kernel_enabled(device_type, enabled=False))
        yield
