"""One training step (forward, then backward with a fixed gradient), and its time and peak memory."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moefx.kernels.cuda.registration import default_kernels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernels_for(impl: str):
    """The context a step of ``impl`` runs in: moefx_ref switches the Triton kernels off."""
    return default_kernels() if impl == "moefx_ref" else contextlib.nullcontext()


def step(fn: Callable[[Tensor], Tensor], params: list[nn.Parameter], x: Tensor, grad: Tensor, device=None,
         impl: str = "") -> tuple[float, Tensor]:
    """One forward + backward; returns the forward's seconds (synchronised when ``device`` is given)
    and the output (the input gradient is left in ``x.grad``)."""
    for p in params:
        p.grad = None
    x.grad = None
    with kernels_for(impl):
        start = time.perf_counter()
        out = fn(x)
        if device is not None:
            sync(device)
        forward = time.perf_counter() - start
        out.backward(grad)
    return forward, out.detach()


def timed_step(fn, params, x, grad, device, impl: str = "") -> tuple[float, float, float | None]:
    """Milliseconds of one step and of its forward and, on CUDA, the step's peak MiB above what
    was allocated before it."""
    peak = None
    if device.type == "cuda":
        # Every impl's weights stay resident, so the step's own peak is measured above the baseline.
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    sync(device)
    start = time.perf_counter()
    forward, _ = step(fn, params, x, grad, device, impl)
    sync(device)
    ms = (time.perf_counter() - start) * 1e3
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return ms, forward * 1e3, peak
