"""The routed experts of an offloaded MoE layer: weights streamed through an ``ExpertCache``.

Legend: S permuted rows, D model dim, E experts.

Same call as ``GroupedExperts`` (rows grouped by expert, offsets), so the layer's forward does
not change; it is not ``resident`` (``moefx.model.is_offloaded``) and does not read token order,
so the layer takes the permuted path. The experts are computed one at a time, each as the moefx
grouped linear over one expert's rows, because they arrive one at a time: only the experts with
rows are loaded, and a budget of one expert must still work.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import moefx.kernels  # noqa: F401  (registers torch.ops.moefx)
from moefx.layer.experts import ExpertMid
from moefx.offloading.cache import ExpertCache


class OffloadedExperts(nn.Module):
    """An ``Experts`` (``moefx.layer.experts``) that holds no weights: ``cache`` brings them in."""

    reads_tokens = False  # rows must be grouped by expert: the experts run one at a time
    resident = False

    def __init__(self, mid: ExpertMid, cache: ExpertCache, layer: int, d_model: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.mid, self.cache, self.layer = mid, cache, layer
        self.d_model, self._dtype = d_model, dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, x_SD: Tensor, offsets_E1: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x_SD.requires_grad:
            raise RuntimeError(
                "an offloaded MoE layer is for inference: its expert weights are overwritten as others stream "
                "in, so it has no backward; run it under torch.no_grad() or torch.inference_mode()"
            )
        bounds = offsets_E1.tolist()  # NOTE: device-to-host sync: which experts to bring in
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
        # Each expert's rows as a one-expert grouped linear's offsets [0, rows]: one copy for the layer.
        single_E2 = torch.tensor([[0, n] for n in counts], device=x_SD.device)
        y_SD = x_SD.new_zeros((x_SD.shape[0], self.d_model))  # dropped rows stay zero, as in grouped_linear

        def compute(expert: int, w: dict[str, Tensor]) -> None:
            a, b = bounds[expert], bounds[expert + 1]
            offsets_2 = single_E2[expert]
            h = torch.ops.moefx.grouped_linear(x_SD[a:b], w["in_proj"][None], _one(w.get("in_bias")), offsets_2)
            y_SD[a:b] = torch.ops.moefx.grouped_linear(self.mid(h), w["out_proj"][None], _one(w.get("out_bias")), offsets_2)

        self.cache.run_layer(self.layer, counts, compute)
        return y_SD

    def extra_repr(self) -> str:
        return f"layer={self.layer}, slots={len(self.cache.slots)}, prefetch={self.cache.prefetch}"


def _one(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias[None]
