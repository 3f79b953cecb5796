"""Hand-written MoE blocks in the classic form, found on the graph:

    probs = softmax(router(x)); w, idx = probs.topk(k)       (or top-k of the logits, then softmax;
    out = sum_e (w at e) * experts[e](x)                        or sigmoid scores)

The block has a router (a ``Linear(D, E)`` child) and a ``ModuleList`` of E experts, each a dense
FFN that find_ffn reads on its own graph. The block's forward is traced with real values
(``make_fx``: any control flow over the routing is followed as it ran), and the routing is read
from that graph: the ``topk`` node, its ``k``, and whether a softmax or a sigmoid of the router's
logits feeds it. Whether the weights are renormalised is left to ``verify`` (each form is tried).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

from moefx.layer.activations import ACTIVATIONS, identify
from moefx.passes.adopt.probe import dense_ffn_of, probe_tokens
from moefx.passes.adopt.routing import sigmoid_candidates, softmax_candidates
from moefx.passes.adopt.spec import AdoptedBlock

_THROUGH = {"_to_copy", "clone", "detach", "view", "reshape", "_unsafe_view", "alias", "contiguous"}


def looks_classic(block: nn.Module) -> bool:
    """A router linear and a ModuleList of as many modules among ``block``'s children (no values read)."""
    lists = [c for c in block.children() if isinstance(c, nn.ModuleList) and len(c) >= 2]
    return not isinstance(block, nn.ModuleList) and sum(
        isinstance(c, nn.Linear) and any(c.out_features == len(m) for m in lists) for c in block.children()) == 1


def match_classic(path: str, block: nn.Module) -> list[AdoptedBlock] | str | None:
    """Candidate specs (one per routing form the graph allows; ``verify`` picks), a reason when the
    block has the parts but moefx cannot express it, or None when it is not such a block."""
    lists = [c for c in block.children() if isinstance(c, nn.ModuleList) and len(c) >= 2]
    routers = [c for c in block.children() if isinstance(c, nn.Linear) and any(c.out_features == len(m) for m in lists)]
    if len(routers) != 1 or isinstance(block, nn.ModuleList):
        return None
    router = routers[0]
    experts = next(m for m in lists if len(m) == router.out_features)
    D = router.in_features
    found = _routing_on_graph(block, router, D)
    if found is None or isinstance(found, str):
        return found
    gate, top_k, softmax_first = found
    templates = []
    for i, expert in enumerate(experts):
        template = dense_ffn_of(expert, D)
        if isinstance(template, str):
            return f"its expert {i} is not an FFN moefx can hold: {template}"
        templates.append(template)
    first = templates[0]
    kinds = {(t.gated, t.has_bias, tuple(t.up_weight.shape), _name(t.activation)) for t in templates}
    if len(kinds) != 1:
        return "its experts differ in form (gating, biases, sizes or activation)"
    if _name(first.activation) is None:
        return f"its experts' activation {first.activation!r} is not one moefx layers build"
    if first.has_bias and any(b is None for t in templates for b in (t.up_bias, t.down_bias)):
        return "its experts have biases on some projections only"
    in_proj = torch.stack([torch.cat((t.gate_weight, t.up_weight)) if t.gated else t.up_weight for t in templates])
    in_bias = out_bias = None
    if first.has_bias:
        in_bias = torch.stack([torch.cat((t.gate_bias, t.up_bias)) if t.gated else t.up_bias for t in templates])
        out_bias = torch.stack([t.down_bias for t in templates])
    weight, bias = router.weight.detach(), None if router.bias is None else router.bias.detach()
    if gate == "sigmoid":
        if bias is not None:
            return "its sigmoid router has a bias, which moefx's sigmoid router does not take"
        candidates = sigmoid_candidates(weight, top_k, None, 1, 1, 1.0)
    else:
        candidates = [r for r in softmax_candidates(weight, bias, top_k) if r.softmax_first == softmax_first]
    return [
        AdoptedBlock(path=path, family="classic (router linear, top-k, ModuleList of experts)", routing=r,
                     in_proj=in_proj.detach(), out_proj=torch.stack([t.down_weight for t in templates]).detach(),
                     in_bias=in_bias, out_bias=out_bias, activation=_name(first.activation), gated=first.gated)
        for r in candidates
    ]


def _name(activation) -> str | None:
    name = activation if isinstance(activation, str) else identify(activation)
    return name if name in ACTIVATIONS else None


def _routing_on_graph(block: nn.Module, router: nn.Linear, D: int) -> tuple[str, int, bool] | str | None:
    """(gate, k, softmax_first) read from the block's traced graph, why not, or None when the block
    does not run on tokens or chooses nothing (not an MoE block)."""
    x = probe_tokens(D, dtype=router.weight.dtype, device=router.weight.device, shape=(8,))
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            gm = make_fx(lambda t: block(t), tracing_mode="real")(x)
    except Exception:  # a module that does not take [T, D] tokens is not an MoE block
        return None
    finally:
        block.train(was_training)
    topks = [n for n in gm.graph.nodes if n.op == "call_function" and _op(n) == "topk"]
    if not topks:
        return None
    if len(topks) > 1:
        return f"its forward makes {len(topks)} top-k choices, not one"
    node = topks[0]
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
    source = _through(node.args[0])
    op = _op(source)
    gate, softmax_first = ("sigmoid", None) if op == "sigmoid" else ("topk", op in ("_softmax", "softmax"))
    logits = _through(source.args[0]) if op in ("sigmoid", "_softmax", "softmax") else source
    if not _reads(gm, logits, router.weight):
        return "its top-k does not choose from a softmax or sigmoid of its router's logits"
    return gate, int(k), softmax_first


def _op(node: fx.Node) -> str:
    target = node.target
    return getattr(getattr(target, "_opname", None), "__str__", lambda: "")() or getattr(target, "__name__", "")


def _through(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and _op(node) in _THROUGH:
        node = node.args[0]
    return node


def _reads(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor) -> bool:
    """Whether ``node`` is a linear product (mm / addmm / linear, through a transpose) of ``weight``."""
    if node.op != "call_function" or _op(node) not in ("mm", "addmm", "linear", "matmul", "bmm"):
        return False
    for arg in node.args:
        while isinstance(arg, fx.Node) and arg.op == "call_function" and _op(arg) in _THROUGH | {"t", "transpose", "permute"}:
            arg = arg.args[0]
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = getattr(gm, arg.target, None)
            if isinstance(value, torch.Tensor) and value.data_ptr() == weight.data_ptr():
                return True
    return False
