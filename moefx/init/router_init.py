"""Router initialisation: where an MoE's router starts, so that tokens spread over the experts from step 0.

- ``random``: the router's own init (``nn.Linear``'s); ``split`` keeps its zero router, whose ties
  make the output with ``top_k == num_experts`` equal the dense FFN's.
- ``weights``: each router row is its expert's mean gate (plain FFN: up) row, less the mean of
  those over the experts, normalised: a token goes to the experts whose neurons it excites most
  (MoEfication's similarity router, Zhang et al. 2022). Meaningful where experts differ (``split``,
  ``drop-upcycle``); identical experts (``upcycle``) leave nothing to tell apart, so the router
  keeps its random init (a warning says so). The default for ``split`` with ``top_k < num_experts``.
- ``kmeans``: the rows are the centroids of the hidden states that reach the layer on calibration
  inputs (balanced spherical k-means, ``moefx.init.clustering``), as LLaMA-MoE v2 does; where the
  experts differ, each expert gets the centroid it responds to most (its output norm there).

Rows are scaled to the norm of a row of ``nn.Linear``'s default init (1/sqrt(3)), so logits keep
the scale of a random router. With renormalised top-k weights, identical experts (``upcycle``) give
the dense output whatever the router, so every router init keeps upcycle exact.

Legend: N points (tokens), D model dim, E experts, C clusters (= E).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moefx.init.clustering import balanced_kmeans

log = logging.getLogger(__name__)

ROUTER_INITS = ("random", "weights", "kmeans")
ROW_NORM = 3 ** -0.5  # the expected norm of a row of nn.Linear's default init, U(-1/sqrt(D), 1/sqrt(D))
MAX_POINTS = 16384  # hidden states clustered per layer (a random sample beyond this)


def default_router_init(init: str, top_k: int, num_experts: int) -> str:
    """``weights`` for ``split`` (its zero router sends every token to the same experts) unless all
    experts are active anyway (``top_k == num_experts``: the zero router keeps the output exact);
    ``random`` for the other inits."""
    return "weights" if init == "split" and top_k < num_experts else "random"


@dataclass(frozen=True)
class CalibrationInputs:
    """Inputs of the model's forward whose hidden states ``kmeans`` clusters, and where they came from."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    source: str = "example inputs"  # recorded in the conversion


@torch.no_grad()
def weights_router_(moe) -> bool:
    """Set ``moe``'s router rows from its experts' input-projection rows; False (router unchanged)
    when the experts are identical, so there is nothing to tell them apart."""
    in_proj = moe.experts.in_proj  # [E, (2)H, D]: a gated expert's gate rows come first
    if in_proj.is_meta:  # a dry run: no values to read
        return True
    means_ED = in_proj[:, : moe.config.d_hidden].double().mean(1)
    centred_ED = means_ED - means_ED.mean(0)
    if centred_ED.norm(dim=1).max() <= 1e-6 * means_ED.norm(dim=1).max().clamp_min(1e-30):
        return False
    _set_rows_(moe.router, centred_ED)
    return True


@torch.no_grad()
def kmeans_router_(moe, x_ND: Tensor, *, seed: int = 0) -> None:
    """Set ``moe``'s router rows to the centroids of the hidden states ``x_ND`` (the layer's
    inputs as rows), each matched to the expert that responds to it most where experts differ."""
    E = moe.config.num_experts
    N = x_ND.shape[0]
    if N < E:
        raise ValueError(
            f"router_init='kmeans' needs at least num_experts={E} calibration tokens per layer, got {N}: "
            "give longer or more calibration inputs"
        )
    generator = torch.Generator().manual_seed(seed)
    keep = min(N, MAX_POINTS) // E * E
    chosen = torch.randperm(N, generator=generator)[:keep].to(x_ND.device)
    x_ND = x_ND[chosen].double()
    directions_ND = F.normalize(x_ND, dim=1)  # spherical: the router has no bias, so it compares directions
    labels_N = balanced_kmeans(directions_ND, E, seed=seed)
    centroids_CD = torch.zeros(E, x_ND.shape[1], dtype=x_ND.dtype, device=x_ND.device)
    centroids_CD.index_add_(0, labels_N, directions_ND)
    means_CD = torch.zeros_like(centroids_CD).index_add_(0, labels_N, x_ND) / (keep // E)
    order = _match_experts(moe, means_CD)
    _set_rows_(moe.router, centroids_CD[order])


def _match_experts(moe, means_CD: Tensor) -> Tensor:
    """``order[e]``: the centroid expert ``e`` takes. Each expert runs on every cluster's mean hidden
    state; greedily, the largest output norm left pairs an expert with a cluster. Identical experts
    (no spread in their responses) keep the clusters' order."""
    E = moe.config.num_experts
    experts = moe.experts
    x_SD = means_CD.to(experts.dtype).repeat(E, 1)  # expert e's rows: every cluster's mean
    offsets_E1 = torch.arange(E + 1, device=x_SD.device) * E
    norms_EC = experts(x_SD, offsets_E1).double().norm(dim=1).view(E, E)
    spread = (norms_EC.max(0).values - norms_EC.min(0).values).max()
    if spread <= 1e-6 * norms_EC.abs().max().clamp_min(1e-30):
        return torch.arange(E)
    order = torch.empty(E, dtype=torch.long)
    scores = norms_EC.clone().cpu()
    for _ in range(E):
        e, c = divmod(int(scores.argmax()), E)
        order[e] = c
        scores[e, :] = scores[:, c] = -float("inf")
    return order


def _set_rows_(router: nn.Module, rows_ED: Tensor) -> None:
    rows_ED = F.normalize(rows_ED.double(), dim=1) * ROW_NORM
    router.weight.copy_(rows_ED.to(router.weight.dtype))


def kmeans_routers_(model: nn.Module, layers: Iterable[tuple[str, nn.Module]], run: Callable[[], object]) -> list[str]:
    """Calibrate the routers of ``layers`` with one forward of ``model`` (``run()``) in eval mode
    and without gradients: each layer's router is set from the hidden states reaching it before the
    layer runs, so later layers see the routing of the calibrated ones. Returns the paths of the
    layers the forward reached (a layer it never reaches keeps its router)."""
    done: list[str] = []

    def hook_for(path: str):
        def calibrate(layer, args):
            if path in done:  # a layer called twice (shared weights) is calibrated on its first call
                return
            axis, D = layer.config.feature_axis, layer.config.d_model
            kmeans_router_(layer, args[0].detach().movedim(axis, -1).reshape(-1, D))
            done.append(path)
        return calibrate

    modes = {module: module.training for module in model.modules()}
    handles = [layer.register_forward_pre_hook(hook_for(path)) for path, layer in layers]
    try:
        model.eval()
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return done
