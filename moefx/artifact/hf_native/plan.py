"""A converted model's tensors under their native hub names, made lazily.

Legend: E experts, H expert hidden dim, D model dim.

    model.layers.{i}.mlp.router.weight        [E, D]     -> {block}.{router}
    model.layers.{i}.mlp.experts.in_proj      [E, 2H, D] -> {block}.experts.{e}.{gate}  [H, D] = in_proj[e, :H]
                                                            {block}.experts.{e}.{up}    [H, D] = in_proj[e, H:]
    model.layers.{i}.mlp.experts.out_proj     [E, D, H]  -> {block}.experts.{e}.{down}  [D, H] = out_proj[e]
    (GraniteMoe keeps the stacks: {block}.input_linear.weight, {block}.output_linear.weight)
    model.layers.{i}.mlp.shared_experts.in_proj.weight  [2S, D] -> {block}.shared_expert.gate_proj.weight [S, D] = [:S]
                                                                  {block}.shared_expert.up_proj.weight   [S, D] = [S:]
    model.layers.{i}.mlp.shared_experts.out_proj.weight [D, S]  -> {block}.shared_expert.down_proj.weight
    model.layers.{i}.mlp.shared_gate.weight             [1, D]  -> {block}.shared_expert_gate.weight
    (Qwen2-MoE; S the shared experts' hidden size)
    every other tensor                                   -> its own name (tied copies left out)

An expert stack is made once, when the writer reaches its first slice, and dropped when the next
stack is made: its slices come one after another, so memory holds one stack at a time. (Hub
indexes list names alphabetically, which interleaves the two stacks of a layer; the order of
tensors in a file does not matter to any reader.)

Qwen2-MoE always has a shared expert, added to the routed ones through ``sigmoid(gate · x)``.
A layer that has none (a converted dense Qwen2) gets one written with width 1
(``shared_expert_intermediate_size=1``) and zero weights, gate included:
``down · (silu(gate_proj · x) * (up_proj · x)) = down · (silu(0) * 0) = 0`` exactly, so the loaded
model computes what the moefx model does. Its gradients are 0 too (each factor's is multiplied by
another that is 0), so it stays 0 in training. (Width 0 would say the same with empty tensors, but
torch warns on every load, and serving engines that convert weights may not take empty ones.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from moefx.artifact.hf_native.layout import NativeFormatError, NativeLayout
from moefx.artifact.shards import PlannedTensor

_SHARED = ("shared_experts.in_proj.weight", "shared_experts.out_proj.weight", "shared_gate.weight")
_IN_DECODER_LAYER = re.compile(r"^(model\.layers\.\d+\.[^.]+)\.(.+)$")  # (the layer's MLP or block, the rest)


class _LastStack:
    """The expert stack the last slice came from, kept until another stack is asked for."""

    def __init__(self) -> None:
        self._entry: PlannedTensor | None = None
        self._tensor: Tensor | None = None

    def get(self, entry: PlannedTensor) -> Tensor:
        if self._entry is not entry:
            self._entry = self._tensor = None  # dropped before the next is made: one stack at a time
            self._tensor, self._entry = entry.make(), entry
        return self._tensor


def native_plan(plan: Sequence[PlannedTensor], layout: NativeLayout) -> list[PlannedTensor]:
    """``plan`` (the moefx model's tensors under ``state_dict`` names) renamed and split as the
    family's hub checkpoints are."""
    stacks = _LastStack()
    out: list[PlannedTensor] = []
    seen: dict[str, set[str]] = {path: set() for path in layout.moe_layers}
    for entry in plan:
        if entry.name in layout.tied:
            continue
        match = _IN_DECODER_LAYER.match(entry.name)
        path, rest = match.groups() if match else (None, None)
        if path not in layout.moe_layers:
            out.append(entry)
            continue
        seen[path].add(rest)
        block = f"model.layers.{layout.moe_layers[path]}.{layout.family.block}"
        if rest.startswith("shared_"):
            out.extend(_shared_tensors(entry, rest, block, stacks))
            continue
        out.extend(_moe_tensors(entry, rest, block, layout, stacks))
    for path, names in seen.items():
        missing = {"router.weight", "experts.in_proj", "experts.out_proj", *(_SHARED if layout.shared_width else ())} - names
        if missing:
            raise NativeFormatError(f"the plan lacks {sorted(missing)} of the MoE layer at {path}")
    return out


def _moe_tensors(entry: PlannedTensor, rest: str, block: str, layout: NativeLayout, stacks: _LastStack) -> Iterator[PlannedTensor]:
    family = layout.family
    if rest == "router.weight":
        yield PlannedTensor(f"{block}.{family.router}", entry.shape, entry.dtype, entry.make)
        if family.gated_shared_expert and not layout.shared_width:
            yield from _zero_shared_expert(block, entry.shape[1], entry.dtype)
    elif rest in ("experts.in_proj", "experts.out_proj") and family.stacked is not None:
        name = family.stacked[0 if rest == "experts.in_proj" else 1]
        yield PlannedTensor(f"{block}.{name}", entry.shape, entry.dtype, entry.make)
    elif rest == "experts.in_proj":
        E, H2, D = entry.shape
        H = H2 // 2
        gate, up, _ = family.per_expert
        for e in range(E):
            yield PlannedTensor(f"{block}.experts.{e}.{gate}", (H, D), entry.dtype, lambda e=e: stacks.get(entry)[e, :H])
            yield PlannedTensor(f"{block}.experts.{e}.{up}", (H, D), entry.dtype, lambda e=e: stacks.get(entry)[e, H:])
    elif rest == "experts.out_proj":
        E, D, H = entry.shape
        for e in range(E):
            yield PlannedTensor(f"{block}.experts.{e}.{family.per_expert[2]}", (D, H), entry.dtype,
                                lambda e=e: stacks.get(entry)[e])
    else:  # layout.py refuses the options that make other tensors; one here is a new kind of layer
        raise NativeFormatError(f"{entry.name} has no place in a {family.moe_type} checkpoint")


def _shared_tensors(entry: PlannedTensor, rest: str, block: str, stacks: _LastStack) -> Iterator[PlannedTensor]:
    """A layer's own shared experts and their gate, as Qwen2-MoE's shared expert (layout.py allows
    them only in a family that has one, gated)."""
    if rest == "shared_experts.in_proj.weight":
        S2, D = entry.shape
        S = S2 // 2
        yield PlannedTensor(f"{block}.shared_expert.gate_proj.weight", (S, D), entry.dtype, lambda: stacks.get(entry)[:S])
        yield PlannedTensor(f"{block}.shared_expert.up_proj.weight", (S, D), entry.dtype, lambda: stacks.get(entry)[S:])
    elif rest == "shared_experts.out_proj.weight":
        yield PlannedTensor(f"{block}.shared_expert.down_proj.weight", entry.shape, entry.dtype, entry.make)
    elif rest == "shared_gate.weight":
        yield PlannedTensor(f"{block}.shared_expert_gate.weight", entry.shape, entry.dtype, entry.make)
    else:
        raise NativeFormatError(f"{entry.name} has no place in a Qwen2-MoE checkpoint")


def _zero_shared_expert(block: str, d_model: int, dtype: torch.dtype) -> Iterator[PlannedTensor]:
    shapes = {"shared_expert.gate_proj.weight": (1, d_model), "shared_expert.up_proj.weight": (1, d_model),
              "shared_expert.down_proj.weight": (d_model, 1), "shared_expert_gate.weight": (1, d_model)}
    for name, shape in shapes.items():
        yield PlannedTensor(f"{block}.{name}", shape, dtype, lambda shape=shape: torch.zeros(shape, dtype=dtype))
