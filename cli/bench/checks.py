"""Each impl's output and input gradient against the plainest impl that ran, and the MISMATCH lines."""

from __future__ import annotations

import torch
from torch import Tensor

from moefx.cli.bench.cases import Result
from moefx.cli.bench.timing import step

# The impl the others' outputs are checked against: the plainest one that ran.
CHECK_REFERENCES = ("moefx_ref", "moefx", "hf_eager")
# Largest relative error (output or input gradient) that counts as agreeing, per dtype: 16-bit
# rounding, plus a few tokens whose near-tied top-k choice may flip between implementations.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # the --dtype choices


def check_outputs(runners: dict, results: dict[str, Result], x: Tensor, grad: Tensor) -> None:
    """Each impl's output and input gradient against the plainest impl that ran (dense computes
    another function and is left out); the errors go into ``results``."""
    reference = next((name for name in CHECK_REFERENCES if name in runners), None)
    if reference is None:
        return
    _, want_out = step(*runners[reference], x, grad, impl=reference)
    want_dx = x.grad.detach().clone()
    for name, (fn, params) in runners.items():
        if name in (reference, "dense"):
            continue
        _, out = step(fn, params, x, grad, impl=name)
        result = results[name]
        result.checked_against = reference
        result.out_err, result.dx_err = relative_error(out, want_out), relative_error(x.grad, want_dx)


def relative_error(got: Tensor, want: Tensor) -> float:
    """‖got − want‖ / ‖want‖ in fp32 (inf where ``got`` has a NaN or an inf)."""
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


def mismatches(results: list[Result], dtype: torch.dtype) -> list[str]:
    """A line for each impl whose output or input gradient is off its reference by more than the tolerance."""
    tolerance = TOLERANCE[dtype]
    return [
        f"{r.shape} {r.impl}: MISMATCH against {r.checked_against}: relative error {r.out_err:.2e} in the output, "
        f"{r.dx_err:.2e} in the input gradient (tolerance {tolerance:g} for {str(dtype).removeprefix('torch.')})"
        for r in results
        if r.out_err is not None and not (r.out_err <= tolerance and r.dx_err <= tolerance)
    ]
