"""``moefx::all_to_all``: exchange rows among the ranks of a process group, differentiably.

    rank r sends x[sum(input_splits[:j]) : sum(input_splits[:j+1])] to rank j, and receives
    output_splits[j] rows from rank j, in rank order.

A wrapper over ``torch.distributed.all_to_all_single`` (uneven splits work on gloo and NCCL), as
one custom op so that an expert-parallel MoE layer's graph shows the exchange as a node. The
backward is the same exchange the other way (splits swapped). The group is passed by name
(``ProcessGroup.group_name``) because custom ops take no Python objects.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group


@torch.library.custom_op("moefx::all_to_all", mutates_args=())
def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group_name: str) -> Tensor:
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"moefx::all_to_all: input_splits {input_splits} sum to {sum(input_splits)}, not the {x.shape[0]} rows of x")
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=_resolve_process_group(group_name))
    return out


@all_to_all.register_fake
def _(x, output_splits, input_splits, group_name):
    return x.new_empty((sum(output_splits), *x.shape[1:]))


def _setup_context(ctx, inputs, output):
    _, ctx.output_splits, ctx.input_splits, ctx.group_name = inputs


def _backward(ctx, grad_out):
    return all_to_all(grad_out, ctx.input_splits, ctx.output_splits, ctx.group_name), None, None, None


all_to_all.register_autograd(_backward, setup_context=_setup_context)
