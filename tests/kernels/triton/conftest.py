"""Triton kernels run on CPU tensors under the interpreter (CI has no GPU). The variable must be
set before the kernel module is imported, since ``triton.jit`` reads it when it decorates.

Triton's interpreter before 3.7 cannot run a loop whose bounds were loaded from memory
(``segment_outer``'s row loop: its ``__index__`` fails on a one-element array under numpy 2);
compiled kernels are unaffected (``test_compile_for_hopper`` passes with Triton 3.4 to 3.9), so
only the interpreter needs the newer release."""

import os

import pytest
import torch

INTERPRETER_NEEDS = (3, 7)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton
    except ImportError:
        triton = None  # each test module skips itself with the install hint
    if triton is not None and os.environ["TRITON_INTERPRET"] == "1":
        found = tuple(int(part) for part in triton.__version__.split(".")[:2])
        if found < INTERPRETER_NEEDS:
            raise pytest.UsageError(
                f"the Triton tests run under Triton's interpreter on this machine (no CUDA), and Triton "
                f"{triton.__version__}'s interpreter cannot run moefx's kernels: pip install 'triton>=3.7'"
            )
