"""The compared implementations, built for one shape with the same expert and router weights, and
each one as a function of the tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import moefx
from moefx.cli.bench.cases import HF_IMPLS, MOEFX_VARIANTS, Result, Shape


class SkipImpl(Exception):
    """An implementation that cannot run here; the message says why."""


class DenseSwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused in one linear."""

    def __init__(self, d: int, hidden: int, *, device, dtype) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.down = nn.Linear(hidden, d, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


def build_moefx(shape: Shape, device, dtype) -> nn.Module:
    return moefx.MoE(
        d_model=shape.d, d_hidden=shape.h, num_experts=shape.experts, top_k=shape.top_k,
        activation="silu", gated=True, bias=False, device=device, dtype=dtype,
    ).train()


def build_mixtral(shape: Shape, experts_impl: str, weights_from: nn.Module, device, dtype) -> nn.Module:
    """A Mixtral sparse MoE block with moefx's weights (same layout: gate rows, then up rows)."""
    try:
        from transformers import MixtralConfig
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as e:
        raise SkipImpl(f"transformers' Mixtral block is not importable ({e})") from e
    if experts_impl != "eager" and experts_impl not in ALL_EXPERTS_FUNCTIONS:
        raise SkipImpl(f"this transformers has no experts implementation {experts_impl!r}")
    # The experts read config._experts_implementation at each forward (integrations/moe.py,
    # @use_experts_implementation); the config's experts_implementation keyword sets it.
    config = MixtralConfig(
        hidden_size=shape.d, intermediate_size=shape.h, num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k, hidden_act="silu", router_jitter_noise=0.0,
        experts_implementation=experts_impl,
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(weights_from.router.weight)
        block.experts.gate_up_proj.copy_(weights_from.experts.in_proj)
        block.experts.down_proj.copy_(weights_from.experts.out_proj)
    return block.to(device=device, dtype=dtype).train()


def grouped_mm_note(block: nn.Module, x: Tensor) -> str:
    """Whether transformers' grouped_mm runs torch's grouped_mm kernel or its own per-expert loop."""
    weight = block.experts.down_proj.transpose(-2, -1)
    offsets = torch.zeros(weight.shape[0], dtype=torch.int32, device=x.device)
    try:  # a private helper: if it moves or changes, leave the note out
        from transformers.integrations.moe import _can_use_grouped_mm
        native = _can_use_grouped_mm(x, weight, offsets)
    except (ImportError, TypeError):
        return ""
    return "torch grouped_mm kernel" if native else "transformers' per-expert fallback loop"


def as_token_fn(module: nn.Module, impl: str, shape: Shape) -> Callable[[Tensor], Tensor]:
    """A function (tokens, d) -> (tokens, d); Mixtral takes (batch, seq, d) and may return a tuple."""
    if impl in ("moefx", *MOEFX_VARIANTS):
        def run_moefx(x_TD: Tensor) -> Tensor:
            module.fused_experts = impl != "moefx_permuted"
            return module(x_TD)

        return run_moefx
    if impl not in HF_IMPLS:
        return module

    def run(x_TD: Tensor) -> Tensor:
        out = module(x_TD.view(1, shape.tokens, shape.d))
        if isinstance(out, tuple):  # older blocks return (hidden, router_logits)
            out = out[0]
        return out.reshape(shape.tokens, shape.d)

    return run


def build_impls(shape: Shape, names: list[str], device, dtype) -> tuple[dict, list[Result]]:
    """The runnable implementations by name, and a skipped Result for each one that cannot run."""
    reference = build_moefx(shape, device, dtype)
    modules, skipped = {}, []
    for name in names:
        try:
            if name == "moefx_ref" and device.type != "cuda":
                raise SkipImpl("on CPU the default ops are moefx's kernels: the moefx row")
            if name in ("moefx", *MOEFX_VARIANTS):
                module = reference
            elif name == "dense":
                module = DenseSwiGLU(shape.d, shape.top_k * shape.h, device=device, dtype=dtype).train()
            else:
                module = build_mixtral(shape, name.removeprefix("hf_"), reference, device, dtype)
            modules[name] = module
        except SkipImpl as e:
            skipped.append(Result(shape.name, name, skipped=str(e)))
    return modules, skipped
