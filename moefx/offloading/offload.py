"""``moefx.offload``: run a converted model whose experts do not fit in device memory.

SE-MoE's ring memory: expert weights stay in a larger, slower tier (pinned host memory, or the
safetensors files of a ``moefx convert`` output) and stream through a fixed pool of device slots
(``moefx.offloading.cache``); everything else moves to the device. Inference only.

    model = moefx.load("out/", dense_on_meta, weights=False)       # structure only, nothing read
    model = moefx.offload(model, device="cuda", budget_bytes=8 << 30, storage="disk", path="out/")
    model.generate(...)
    print(moefx.offload_stats(model))         # hits, prefetch hits, misses, loads, bytes per token, waits, slots
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from moefx.artifact.format import read_tensors
from moefx.artifact.tensors import assign_tensors
from moefx.model import is_expert_parallel, is_offloaded, moe_layers, named_tensors
from moefx.offloading.cache import ExpertCache, OffloadStats
from moefx.offloading.experts import OffloadedExperts
from moefx.offloading.store import (
    DiskExpertStore,
    ExpertLayout,
    HostExpertStore,
    OffloadError,
    SafetensorsIndex,
    stacked_expert_tensors,
)

log = logging.getLogger(__name__)

STORAGES = ("cpu", "disk")
_ATTRIBUTE = "_moefx_offload"


def offload(
    model: nn.Module, *, device, budget_bytes: int, storage: str = "cpu", path: str | Path | None = None,
    prefetch: bool = True,
) -> nn.Module:
    """Make ``model`` (converted by ``moefx.moefy`` or ``moefx.load``) ready for inference on
    ``device`` with at most ``budget_bytes`` of expert weights there at any time.

    ``storage="cpu"`` keeps the model's expert weights in host memory (pinned for a GPU);
    ``storage="disk"`` reads them from ``path`` (a ``moefx convert`` / ``moefx.save`` output or a
    ``.safetensors`` file) when needed, and fills any other weight still on the meta device from
    there too, so the model may come from ``moefx.load(path, dense, weights=False)``. The budget
    is split into slots of one expert each (the largest expert, when layers differ). ``prefetch``
    loads on a background thread ahead of use; without it, experts load when asked for.
    Returns ``model``, changed in place: evaluation mode, no gradients.
    """
    device = torch.device(device)
    layers = _check_arguments(model, budget_bytes, storage, path)
    stacked = [stacked_expert_tensors(layer.experts) for _, layer in layers]
    layouts = [ExpertLayout.of(s) for s in stacked]
    slot_bytes = max(layout.slot_bytes for layout in layouts)
    if budget_bytes < slot_bytes:
        biggest = next(p for (p, _), layout in zip(layers, layouts) if layout.slot_bytes == slot_bytes)
        raise ValueError(
            f"budget_bytes={budget_bytes} is smaller than one expert ({slot_bytes} bytes in {biggest!r}): the budget "
            f"must hold at least one expert, budget_bytes >= {slot_bytes}"
        )
    num_experts = [layer.config.num_experts for _, layer in layers]
    num_slots = min(budget_bytes // slot_bytes, sum(num_experts))

    expert_ids = {id(t) for s in stacked for t in s.values()}
    others = [(name, t) for name, t in named_tensors(model) if id(t) not in expert_ids]
    if storage == "cpu":
        _check_not_meta(stacked, layers, others)
        store = HostExpertStore(stacked, layouts, pin=device.type == "cuda")
        filled = {}
    else:
        index = SafetensorsIndex(path)
        names = [{part: f"{p}.experts.{part}" for part in s} for (p, _), s in zip(layers, stacked)]
        filled = _read_meta_tensors(index, others)
        store = DiskExpertStore(index, names, layouts, num_experts, staging_bytes=slot_bytes, device=device)

    # Everything is checked and read: from here on nothing fails on bad input.
    cache = ExpertCache(store, layouts, num_experts, num_slots=num_slots, slot_bytes=slot_bytes, device=device,
                        prefetch=prefetch)
    for i, (_, layer) in enumerate(layers):
        layer.experts = OffloadedExperts(layer.experts.mid, cache, i, layer.config.d_model, layouts[i].dtype)
        layer.register_forward_pre_hook(_token_counter(cache, i))
    assign_tensors(model, filled)
    model.to(device).eval().requires_grad_(False)
    setattr(model, _ATTRIBUTE, cache)
    log.info("offloaded %d MoE layers: %d slots of %d bytes on %s, experts in %s", len(layers), num_slots,
             slot_bytes, device, storage)
    return model


def offload_stats(model: nn.Module, *, reset: bool = False) -> OffloadStats:
    """The expert cache's counts since ``offload`` (or the last ``reset=True``)."""
    cache = getattr(model, _ATTRIBUTE, None)
    if cache is None:
        raise ValueError("offload_stats() needs a model returned by moefx.offload")
    stats = cache.stats()
    if reset:
        cache.reset_stats()
    return stats


def _token_counter(cache: ExpertCache, index: int):
    """A pre-hook counting the token rows entering an offloaded layer (bytes moved per token)."""
    def count(layer, args) -> None:
        cache.count_tokens(index, args[0].numel() // layer.config.d_model)
    return count


def _check_arguments(model: nn.Module, budget_bytes, storage: str, path) -> list:
    if storage not in STORAGES:
        raise ValueError(f"storage={storage!r} is unknown: must be one of {list(STORAGES)}")
    if storage == "disk" and path is None:
        raise ValueError("storage='disk' reads the experts from a file: pass path= a moefx convert output or a .safetensors file")
    if storage == "cpu" and path is not None:
        raise ValueError(f"path={str(path)!r} is only read with storage='disk'; with storage='cpu' the experts come from the model")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes={budget_bytes!r} must be a positive int (bytes of expert weights on the device)")
    if is_offloaded(model):
        raise ValueError("the model is offloaded already: offload the converted model once")
    if is_expert_parallel(model):
        raise ValueError("an expert-parallel model cannot be offloaded: offload a single-process model")
    layers = list(moe_layers(model))
    if not layers:
        raise ValueError("the model has no moefx MoE layers: convert it first (moefx.moefy, or moefx.load of a convert output)")
    return layers


def _check_not_meta(stacked, layers, others) -> None:
    for (p, _), s in zip(layers, stacked):
        if any(t.is_meta for t in s.values()):
            raise ValueError(
                f"the experts of {p!r} are on the meta device: storage='cpu' keeps the model's own expert weights; "
                "load them first, or use storage='disk' with path= the saved model"
            )
    meta = [name for name, t in others if t.is_meta]
    if meta:
        raise ValueError(f"{meta[:3]} are on the meta device: load the weights first, or use storage='disk' with path=")


def _read_meta_tensors(index: SafetensorsIndex, others) -> dict[str, torch.Tensor]:
    """The non-expert tensors still on meta, read from the file (they are small next to the experts)."""
    wanted = {name: t for name, t in others if t.is_meta}
    for name in wanted:
        if name not in index.entries:
            raise OffloadError(f"tensor {name!r} is on the meta device and missing from {index.path}: load it first")
    tensors = read_tensors({name: index.entries[name].file for name in wanted})
    for name, value in tensors.items():
        t = wanted[name]
        if value.shape != t.shape or value.dtype != t.dtype:
            raise OffloadError(
                f"tensor {name!r} in {index.entries[name].file} is {value.dtype} {tuple(value.shape)}, but the model's "
                f"is {t.dtype} {tuple(t.shape)}: offload the model the file was saved from"
            )
    return tensors
