"""Triton kernels run on CPU tensors under the interpreter (CI has no GPU). The variable must be
set before the kernel module is imported, since ``triton.jit`` reads it when it decorates."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
