"""The tensors of a model being saved or loaded: meta twins (tied tensors kept tied), and the
saved tensors put in place."""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The model a DistributedDataParallel wraps, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def meta_twins(model: nn.Module) -> dict[int, Tensor]:
    """A meta tensor for each parameter and buffer, by the id of the original: one per tensor, so a
    tensor several modules hold (tied embeddings) keeps one twin. The caller keeps the originals
    alive while it uses the ids."""
    twins = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for old in table.values():
                if old is not None and id(old) not in twins:
                    meta = torch.empty_like(old, device="meta")
                    twins[id(old)] = nn.Parameter(meta, old.requires_grad) if isinstance(old, nn.Parameter) else meta
    return twins


def meta_copy(model: nn.Module) -> nn.Module | None:
    """A deep copy of ``model`` whose parameters and buffers are on meta (tied ones still tied);
    None for a model that cannot be copied (it holds a lock, say)."""
    try:
        return copy.deepcopy(model, meta_twins(model))
    except Exception:
        log.debug("cannot copy %s to check the fit first", type(model).__name__, exc_info=True)
        return None


def to_meta_keeping_ties(model: nn.Module) -> None:
    """``model.to("meta")``, except that a tensor several modules hold (tied embeddings) stays one
    tensor: ``.to`` gives each holder a copy of its own, so the saved file, which has the tied
    tensor once, would then miss the others."""
    twins = meta_twins(model)  # built before any swap, while every original is alive
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, old in table.items():
                if old is not None:
                    table[key] = twins[id(old)]


@torch.no_grad()
def assign_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Fill the model's tensors named in ``tensors``: in place where shape and dtype match (an
    optimizer or a hook that holds them keeps working), else by replacing them (meta tensors,
    another dtype), keeping tied and shared ones tied. Tensors land on the device the model's
    tensor is on (the CPU for a meta one)."""
    new = {}
    for name, p in model.named_parameters():
        if name not in tensors or _fill_in_place(p, tensors[name]):
            continue
        device = "cpu" if p.is_meta else p.device
        new[id(p)] = nn.Parameter(tensors[name].to(device), requires_grad=p.requires_grad)
    for name, b in model.named_buffers():
        if name in tensors and not _fill_in_place(b, tensors[name]):
            new[id(b)] = tensors[name].to("cpu" if b.is_meta else b.device)
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, old in table.items():
                if old is not None and id(old) in new:
                    table[key] = new[id(old)]


def _fill_in_place(old: Tensor, value: Tensor) -> bool:
    if old.is_meta or old.dtype != value.dtype or old.shape != value.shape:
        return False
    old.copy_(value)
    return True

