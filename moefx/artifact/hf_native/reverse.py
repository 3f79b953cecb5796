"""Native hub names back into a converted model: what ``plan.py`` writes, read into the expert
stacks in place. A Trainer resuming from a checkpoint that ``save_pretrained`` wrote natively
calls ``model.load_state_dict`` with those names, one file at a time, so a stack's experts may come
in several calls: each slice is copied into its rows as it comes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moefx.artifact.hf_native.layout import NativeFormatError, native_layout
from moefx.model import moe_layers


@dataclass(frozen=True)
class Slot:
    """Where a native tensor goes: rows of a moefx tensor; ``name`` None for Qwen2-MoE's
    zero shared expert, which the moefx model has no place for."""

    name: str | None
    index: tuple = ()  # () the whole tensor; (e,) or (e, slice) one expert's rows; (slice,) the shared expert's


def native_slots(model: nn.Module) -> dict[str, Slot]:
    """Every native name ``write_native`` gives ``model``'s MoE tensors, and where it comes from."""
    layout = native_layout(model)
    family, layers = layout.family, dict(moe_layers(model))
    slots: dict[str, Slot] = {}
    for path, i in layout.moe_layers.items():
        block = f"model.layers.{i}.{family.block}"
        E, H = layers[path].config.num_experts, layers[path].config.d_hidden
        in_proj, out_proj = f"{path}.experts.in_proj", f"{path}.experts.out_proj"
        slots[f"{block}.{family.router}"] = Slot(f"{path}.router.weight")
        if family.stacked is not None:
            slots[f"{block}.{family.stacked[0]}"], slots[f"{block}.{family.stacked[1]}"] = Slot(in_proj), Slot(out_proj)
        else:
            gate, up, down = family.per_expert
            for e in range(E):
                slots[f"{block}.experts.{e}.{gate}"] = Slot(in_proj, (e, slice(0, H)))
                slots[f"{block}.experts.{e}.{up}"] = Slot(in_proj, (e, slice(H, 2 * H)))
                slots[f"{block}.experts.{e}.{down}"] = Slot(out_proj, (e,))
        if family.gated_shared_expert and layout.shared_width:  # the layer's own shared experts
            S, shared = layout.shared_width, f"{path}.shared_experts"
            slots[f"{block}.shared_expert.gate_proj.weight"] = Slot(f"{shared}.in_proj.weight", (slice(0, S),))
            slots[f"{block}.shared_expert.up_proj.weight"] = Slot(f"{shared}.in_proj.weight", (slice(S, 2 * S),))
            slots[f"{block}.shared_expert.down_proj.weight"] = Slot(f"{shared}.out_proj.weight")
            slots[f"{block}.shared_expert_gate.weight"] = Slot(f"{path}.shared_gate.weight")
        elif family.gated_shared_expert:
            for name in ("gate_proj", "up_proj", "down_proj"):
                slots[f"{block}.shared_expert.{name}.weight"] = Slot(None)
            slots[f"{block}.shared_expert_gate.weight"] = Slot(None)
    return slots


def load_native_tensors(model: nn.Module, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], set[str]]:
    """Copy the native-named MoE tensors of ``state_dict`` into ``model``'s stacks in place.
    Returns the other entries, to load as usual, and the moefx names whose every row came."""
    try:
        slots = native_slots(model)
    except NativeFormatError:
        return dict(state_dict), set()  # a model that has no native form reads only its own names
    own = dict(model.named_parameters())
    rest, rows = {}, {}
    with torch.no_grad():
        for name, tensor in state_dict.items():
            slot = slots.get(name)
            if slot is None:
                rest[name] = tensor
            elif slot.name is None:
                if tensor.count_nonzero():
                    raise NativeFormatError(f"{name} is not zero, and this model has no shared expert to put it in")
            else:
                target = own[slot.name]
                target[slot.index].copy_(tensor)
                rows.setdefault(slot.name, []).append(slot.index)
    complete = {name for name, parts in rows.items() if _covers(parts, own[name])}
    return rest, complete


def _covers(parts: list[tuple], target: Tensor) -> bool:
    """Whether the copied parts (each whole, (e,) or (e, rows)) fill every row of ``target``."""
    if () in parts:
        return True
    filled = torch.zeros(target.shape[:2], dtype=torch.bool)
    for part in parts:
        filled[part] = True
    return bool(filled.all())
