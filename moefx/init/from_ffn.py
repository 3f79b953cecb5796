"""An ``MoE`` layer whose experts start from a dense FFN: the body of ``MoE.from_ffn``.

It sizes the layer from the ``FFNTemplate`` (d_model, d_hidden, activation, gating, biases), builds
it on the template's device and dtype, and fills its weights with an init strategy
(``moefx.init.strategies``).
"""

from __future__ import annotations

import copy
import logging

from torch import nn

from moefx.init.router_init import default_router_init, weights_router_
from moefx.init.strategies import INIT_STRATEGIES, init_from_template
from moefx.init.template import FFNTemplate
from moefx.layer.config import MoEConfig
from moefx.layer.moe import MoE

log = logging.getLogger(__name__)


def moe_from_ffn(
    template: FFNTemplate, *, num_experts: int, top_k: int = 2, init: str = "upcycle", drop_fraction: float = 0.5,
    split_by: str = "contiguous", router_init: str | None = None, device=None, dtype=None,
    layer_class: type[MoE] = MoE, **options,
) -> MoE:
    """A ``layer_class`` (an ``MoE``) initialised from ``template`` with strategy ``init`` and its router
    with ``router_init`` (``random`` or ``weights``; None: ``default_router_init``, see
    ``moefx.init.router_init``); ``options`` are further ``MoEConfig`` fields. Device and dtype default
    to the template's weights'."""
    if init not in INIT_STRATEGIES:
        raise ValueError(f"init={init!r} is unknown: must be one of {list(INIT_STRATEGIES)}")
    if router_init is None:
        router_init = default_router_init(init, top_k, num_experts)
    if router_init not in ("random", "weights"):
        hint = (" (kmeans needs hidden states: use moefy(..., router_init='kmeans') or "
                "moefx.init.router_init.kmeans_router_(layer, x_ND))" if router_init == "kmeans" else "")
        raise ValueError(f"router_init={router_init!r} is not one MoE.from_ffn can apply: use 'random' or 'weights'{hint}")
    d_hidden = template.d_hidden
    if init == "split":
        if d_hidden % num_experts:
            raise ValueError(
                f"init='split' partitions d_hidden={d_hidden} among num_experts={num_experts}, which must "
                f"divide it; choose num_experts among the divisors of {d_hidden}"
            )
        d_hidden //= num_experts
        # The router starts at zero, so each of k experts gets weight 1/k; see ``split`` in moefx.init.strategies.
        options.setdefault("routed_scale", float(num_experts))
    activation = template.activation
    if isinstance(activation, nn.Module):
        activation = copy.deepcopy(activation)
    config = MoEConfig(
        d_model=template.d_model, d_hidden=d_hidden, num_experts=num_experts, top_k=top_k,
        activation=activation, gated=template.gated, bias=template.has_bias, **options,
    )
    weight = template.up_weight
    device = weight.device if device is None else device
    moe = layer_class(config, device=device, dtype=weight.dtype if dtype is None else dtype,
                      init_experts=not _fills_experts_alone(init, config))
    init_from_template(moe, template, init, drop_fraction=drop_fraction, split_by=split_by)
    if router_init == "weights" and not weights_router_(moe):
        log.warning("router_init='weights' with init=%r: the experts are identical, so their weights cannot tell "
                    "them apart; the router keeps its random init (use router_init='kmeans')", init)
    return moe


def _fills_experts_alone(init: str, config: MoEConfig) -> bool:
    """Whether ``init`` overwrites every expert tensor and nothing draws from the layer's generator
    after the experts' random init (``moefx.init.seeding``): then that init, wasted work (2 s of a
    16 s streamed conversion of a 317M Llama to 8 experts, benchmarks/RESULTS.md), is skipped and
    every random value of the layer stays as it was. The shared experts (built after the routed ones)
    and drop-upcycle's re-drawn neurons draw after it."""
    return init in ("upcycle", "split") and not config.num_shared_experts
