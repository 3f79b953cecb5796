"""``moefx::swiglu``: the gated SiLU between an expert's two linears, in one op.

Legend: S rows, H hidden features; ``h_S2H`` holds the gate features first and the up features
second, as the experts' ``in_proj`` lays them out.

    swiglu(h_S2H) = silu(h_S2H[:, :H]) * h_S2H[:, H:]

The same as ``ExpertMid(nn.SiLU(), gated=True)`` computes with separate ops, but its backward
writes both halves of the input gradient into one tensor (autograd would compute them apart and
then concatenate them, a copy of the whole ``[S, 2H]`` gradient) and saves only the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(h_S2H: Tensor) -> None:
    if h_S2H.dim() < 1 or h_S2H.shape[-1] % 2:
        raise ValueError(f"moefx::swiglu expects gate and up features of equal width, got shape {tuple(h_S2H.shape)}")


@torch.library.custom_op("moefx::swiglu", mutates_args=())
def swiglu(h_S2H: Tensor) -> Tensor:
    _check(h_S2H)
    gate, up = h_S2H.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


@swiglu.register_fake
def _(h_S2H):
    _check(h_S2H)
    return h_S2H.new_empty((*h_S2H.shape[:-1], h_S2H.shape[-1] // 2))


@torch.library.custom_op("moefx::swiglu_backward", mutates_args=())
def swiglu_backward(grad_SH: Tensor, h_S2H: Tensor) -> Tensor:
    gate, up = h_S2H.chunk(2, dim=-1)
    grad_S2H = torch.empty_like(h_S2H)
    grad_gate, grad_up = grad_S2H.chunk(2, dim=-1)
    torch.mul(grad_SH, F.silu(gate), out=grad_up)
    torch.ops.aten.silu_backward.grad_input(grad_SH * up, gate, grad_input=grad_gate)
    return grad_S2H


@swiglu_backward.register_fake
def _(grad_SH, h_S2H):
    return torch.empty_like(h_S2H)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_SH):
    (h_S2H,) = ctx.saved_tensors
    return swiglu_backward(grad_SH.contiguous(), h_S2H)


swiglu.register_autograd(_backward, setup_context=_setup_context)
