"""Blocks with fused expert weights (transformers 5's form): a router child whose weight is
``[E, D]`` and that returns ``(logits, weights, indices)``, an experts child holding stacked
``[E, ...]`` projections (``gate_up_proj``/``up_proj``, ``down_proj``, optional ``*_bias``), and
optionally shared experts (an FFN child) with a ``Linear(D, 1)`` gate.

    block(x) = experts(x, router(x)) [+ (sigmoid(shared_gate(x)) *) shared(x)]
      ──▶ AdoptedBlock(routing found by running the router, weights in moefx's layout)

Nothing here names a model class: the parts are told apart by their shapes, the routing by what
the router computes on probe tokens (``routing.choose``), the activation by what the experts'
gate function computes; ``verify`` then checks the whole block.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from moefx.layer.activations import ACTIVATIONS, ClampedSwiGLU, identify, make_activation
from moefx.passes.adopt.probe import dense_ffn_of, probe_tokens
from moefx.passes.adopt.routing import choose, sigmoid_candidates, softmax_candidates
from moefx.passes.adopt.spec import AdoptedBlock, SharedExperts

_GATED, _PLAIN = ("gate_up_proj", "down_proj"), ("up_proj", "down_proj")


def looks_fused(block: nn.Module) -> bool:
    """Stacked experts and one router among ``block``'s children (shapes only, no values read)."""
    experts_name = next((n for n, c in block.named_children() if _stacked(c) is not None), None)
    if experts_name is None:
        return False
    E = _stacked(block.get_submodule(experts_name))[1]
    return sum(n != experts_name and _router_weight(c, E) is not None for n, c in block.named_children()) == 1


def match_fused_experts(path: str, block: nn.Module, aux_loss_coef: float | None) -> AdoptedBlock | str | None:
    """The block as an ``AdoptedBlock``; a reason when it is such a block moefx cannot express; None
    when it is not one."""
    experts_name = next((n for n, c in block.named_children() if _stacked(c) is not None), None)
    if experts_name is None:
        return None
    experts = block.get_submodule(experts_name)
    gated, E = _stacked(experts)
    routers = [(n, c) for n, c in block.named_children() if n != experts_name and _router_weight(c, E) is not None]
    if len(routers) != 1:
        return None if not routers else f"{len(routers)} children could be its router: {[n for n, _ in routers]}"
    router_name, router = routers[0]
    weight_ED = _router_weight(router, E)
    D = weight_ED.shape[1]
    if getattr(block, "jitter_noise", 0) or getattr(block, "router_jitter_noise", 0):
        return "its training-time jitter scales the experts' input too; moefx jitters only the router's input"
    if getattr(experts, "has_post_expert_norm", False):
        return "its experts normalise their outputs (post-expert norm), which moefx experts do not"
    routing = _routing(router, weight_ED, E)
    if isinstance(routing, str):
        return routing
    layout = _weights(experts, gated, D)
    if isinstance(layout, str):
        return layout
    in_proj, out_proj, in_bias, out_bias, interleaved = layout
    activation, why_not = _activation(experts, gated, interleaved, out_proj.shape[2])
    if why_not:
        return why_not
    rest = [(n, c) for n, c in block.named_children() if n not in (experts_name, router_name)]
    shared = _shared(rest, D, activation, in_bias is not None)
    if isinstance(shared, str):
        return shared
    coef = 0.0 if aux_loss_coef is None else aux_loss_coef * routing.top_k
    return AdoptedBlock(
        path=path, family="fused experts", routing=routing, in_proj=in_proj, out_proj=out_proj, in_bias=in_bias,
        out_bias=out_bias, activation=activation, gated=gated, shared=shared, load_balance_coef=coef,
    )


def _stacked(module: nn.Module) -> tuple[bool, int] | None:
    """(gated, E) of an experts module holding ``[E, ., .]`` projections, else None."""
    own = dict(module.named_parameters(recurse=False))
    for names, gated in ((_GATED, True), (_PLAIN, False)):
        if all(n in own and own[n].dim() == 3 for n in names) and own[names[0]].shape[0] == own[names[1]].shape[0]:
            return gated, own[names[0]].shape[0]
    return None


def _router_weight(module: nn.Module, E: int) -> Tensor | None:
    w = getattr(module, "weight", None)
    ok = isinstance(w, Tensor) and w.dim() == 2 and w.shape[0] == E and not isinstance(module, nn.Linear)
    return w.detach() if ok else None


def _routing(router: nn.Module, weight_ED: Tensor, E: int):
    bias = getattr(router, "bias", None)
    bias_E = bias.detach() if isinstance(bias, Tensor) and bias.shape == (E,) else None
    dtype = weight_ED.dtype
    if dtype not in (torch.float32, torch.float64):  # bfloat16 rounds weights too coarsely to tell the forms apart:
        router, dtype = copy.deepcopy(router).double(), torch.float64  # a float64 copy of the router ([E, D]) alone
    x_TD = probe_tokens(weight_ED.shape[1], dtype=dtype, device=weight_ED.device)
    with torch.no_grad():
        out = router(x_TD)
    if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, Tensor) for t in out)):
        return "its router does not return (logits, weights, indices)"
    _, weights_TK, experts_TK = out
    top_k = experts_TK.shape[-1]
    score_bias = next((b.detach() for b in router.buffers(recurse=False) if b.shape == (E,)), None)
    groups = int(getattr(router, "num_group", getattr(router, "n_group", 1)) or 1)
    candidates = sigmoid_candidates(
        weight_ED, top_k, score_bias, groups, int(getattr(router, "topk_group", groups) or groups),
        float(getattr(router, "routed_scaling_factor", 1.0)),
    )
    if score_bias is None:
        candidates = softmax_candidates(weight_ED, bias_E, top_k) + candidates
    found = choose(x_TD, weights_TK, experts_TK, candidates)
    if found is None:
        return "its router computes none of moefx's routings (softmax top-k, renormalised or not; sigmoid with a bias)"
    if found.bias_E is None and bias_E is not None:
        return "its router has a bias that moefx's sigmoid router does not take"
    return found


def _weights(experts: nn.Module, gated: bool, D: int):
    """(in_proj [E, (2)H, D] gate rows first, out_proj [E, D, H], in_bias, out_bias, interleaved)."""
    first, down = (getattr(experts, n).detach() for n in (_GATED if gated else _PLAIN))
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:
        plain, swapped = first.shape[2] == D and down.shape[1] == D, first.shape[1] == D and down.shape[2] == D
        if plain == swapped:
            return "the layout of its expert weights ([E, out, in] or [E, in, out]) cannot be told from their shapes"
        transposed = swapped
    if transposed:
        first, down = first.transpose(1, 2), down.transpose(1, 2)
    if first.shape[2] != D or down.shape[1] != D:
        return f"its expert weights {tuple(first.shape)}, {tuple(down.shape)} do not fit the model dim {D}"
    bias_names = ("gate_up_proj_bias", "down_proj_bias") if gated else ("up_proj_bias", "down_proj_bias")
    in_bias, out_bias = (getattr(experts, n, None) for n in bias_names)
    if (in_bias is None) != (out_bias is None):
        return "only one of its expert projections has a bias; moefx experts have both or neither"
    in_bias = None if in_bias is None else in_bias.detach()
    out_bias = None if out_bias is None else out_bias.detach()
    interleaved = gated and getattr(experts, "is_concatenated", True) is False
    if interleaved:  # [g0, u0, g1, u1, ...] → [g..., u...]
        first = torch.cat((first[:, 0::2], first[:, 1::2]), dim=1)
        in_bias = None if in_bias is None else torch.cat((in_bias[:, 0::2], in_bias[:, 1::2]), dim=1)
    return first.contiguous(), down.contiguous(), in_bias, out_bias, interleaved


def _activation(experts: nn.Module, gated: bool, interleaved: bool, H: int):
    """(the activation whose moefx mid computes what the experts compute between their projections,
    None) or (None, why not)."""
    act = getattr(experts, "act_fn", None)
    candidates = []
    name = identify(act) if callable(act) else None
    if name in ACTIVATIONS:
        candidates.append(name)
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if gated and isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
        default = (float(alpha), float(limit)) == (1.702, 7.0)
        candidates.append("clamped_swiglu" if default else ClampedSwiGLU(float(alpha), float(limit)))
    apply_gate = getattr(experts, "_apply_gate", None)
    if not gated or apply_gate is None:
        return (candidates[0], None) if candidates else (None, f"its experts' activation {act!r} is not one moefx builds")
    h_family = torch.randn(64, 2 * H, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4
    h_moefx = torch.cat((h_family[:, 0::2], h_family[:, 1::2]), dim=1) if interleaved else h_family
    with torch.no_grad():
        want = apply_gate(h_family)
        for candidate in candidates:
            fn = make_activation(candidate)
            gate, up = h_moefx.chunk(2, dim=-1)
            got = fn(gate, up) if getattr(fn, "takes_gate_and_up", False) else fn(gate) * up
            if torch.allclose(got, want, rtol=1e-6, atol=1e-9):
                return candidate, None
    return None, "its experts' gated activation is none of moefx's (act(gate) * up, GPT-OSS's clamped SwiGLU)"


def _shared(children: list[tuple[str, nn.Module]], D: int, activation, bias: bool):
    """The shared experts (an FFN child) and their sigmoid gate (a ``Linear(D, 1)`` child), or a reason."""
    gates = [c for _, c in children if isinstance(c, nn.Linear) and c.in_features == D and c.out_features == 1]
    ffns = [(n, c) for n, c in children if not any(c is g for g in gates) and any(True for _ in c.parameters())]
    if not ffns:
        return "its shared-expert gate has no shared expert" if gates else None
    if len(ffns) > 1 or len(gates) > 1:
        return f"it has parts moefx does not know: {[n for n, _ in ffns]}"
    name, module = ffns[0]
    template = dense_ffn_of(module, D)
    if isinstance(template, str):
        return f"its part {name!r} is not an FFN moefx can hold as shared experts ({template})"
    if not template.gated:
        return f"its shared expert {name!r} is not gated like its experts"
    if template.has_bias or bias:
        return f"its shared expert {name!r} or its experts have biases, which moefx's shared experts do not take"
    if identify(template.activation) != (activation if isinstance(activation, str) else None):
        return f"its shared expert {name!r} uses another activation than its experts"
    gate_weight = gates[0].weight.detach() if gates else None
    if gates and gates[0].bias is not None:
        return "its shared-expert gate has a bias, which moefx's does not take"
    in_proj = torch.cat((template.gate_weight, template.up_weight)).detach()
    return SharedExperts(in_proj=in_proj, out_proj=template.down_weight.detach(), gate_weight_1D=gate_weight)
