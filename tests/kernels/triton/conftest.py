"""Triton kernels run on CPU tensors under the interpreter (CI has no GPU). The variable must be
set before the kernel module is imported, since ``triton.jit`` reads it when it decorates.

Triton's interpreter before 3.7 cannot run a loop whose bounds were loaded from memory
(``segment_outer``'s row loop: its ``__index__`` fails on a one-element array under numpy 2).
Compiled kernels are unaffected (``test_compile_for_hopper`` passes with Triton 3.4 to 3.9), so
with an older Triton and no GPU the tests that need the interpreter are skipped, each saying
why and what to install; the compile check still runs."""

import os

import pytest
import torch

INTERPRETER_NEEDS = (3, 7)
NEEDS_NO_INTERPRETER = {"test_compile_for_hopper.py"}


def _old_interpreter() -> str | None:
    """Why the interpreter cannot run the kernels here, or None when it can (or is not used)."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import triton
    except ImportError:
        return None  # each test module skips itself with the install hint
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= INTERPRETER_NEEDS:
        return None
    return (f"Triton {triton.__version__}'s interpreter cannot run moefx's kernels (this machine has no "
            f"CUDA, so the tests run them under it): pip install 'triton>=3.7'")


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    reason = _old_interpreter()
    if reason is None:
        return
    here = os.path.dirname(__file__)
    for item in items:
        path = str(item.path)
        if path.startswith(here) and os.path.basename(path) not in NEEDS_NO_INTERPRETER:
            item.add_marker(pytest.mark.skip(reason=reason))
