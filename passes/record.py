"""What ``moefy`` did to a model, kept on the model so that ``moefx.save`` can write it down and
``moefx.load`` can do it again on the dense architecture.

Each ``moefy`` call that converts something appends one ``Conversion`` to the root module's
``_moefx_conversions`` tuple (a plain attribute: not in the state dict, copied by ``deepcopy``).
A conversion holds the options as given, the FFNs converted, the candidates left alone with
their reasons, and the example inputs' shapes and dtypes (not their values), which is all a
re-run of the passes needs: they look at structure, not at numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

from moefx.passes.options import ConversionOptions

_ATTRIBUTE = "_moefx_conversions"
_SOURCE = "_moefx_source"  # the model file a loaded model was built from, for the next save


@dataclass(frozen=True)
class ConvertedFFN:
    path: str  # the MoE's module path
    kind: str  # "mlp" or "glu"
    d_model: int
    d_hidden: int  # of the dense FFN
    activation: str
    bias: bool
    placement: str  # "swap", "fold" or "inline"


@dataclass(frozen=True)
class Conversion:
    options: ConversionOptions  # moefy's options (num_experts, top_k, init, gate, ...); JSON by its as_dict()
    converted: tuple[ConvertedFFN, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # found but not converted: (path, why)
    rejected: tuple[tuple[str, str], ...] = ()  # candidates that are not FFNs: (path, why)
    example_inputs: dict | None = None  # input_spec() of (args, kwargs); None: no inputs were given
    router_calibration: str | None = None  # router_init="kmeans": the inputs its forward ran on
    adopted: dict | None = None  # existing MoE blocks made moefx layers: path → moefx.passes.adopt's record

    def as_dict(self) -> dict:
        return {**asdict(replace(self, options=None)), "options": self.options.as_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> Conversion:
        return cls(
            options=ConversionOptions.from_dict(data["options"]),
            converted=tuple(ConvertedFFN(**c) for c in data["converted"]),
            skipped=tuple(tuple(s) for s in data.get("skipped", ())),
            rejected=tuple(tuple(r) for r in data.get("rejected", ())),
            example_inputs=data.get("example_inputs"),
            router_calibration=data.get("router_calibration"),
            adopted=data.get("adopted"),
        )


def conversions(model: nn.Module) -> tuple[Conversion, ...]:
    """Every conversion ``moefy`` applied to ``model``, oldest first."""
    return getattr(model, _ATTRIBUTE, ())


def add_conversion(model: nn.Module, conversion: Conversion) -> None:
    set_conversions(model, conversions(model) + (conversion,))


def set_conversions(model: nn.Module, recorded: tuple[Conversion, ...]) -> None:
    object.__setattr__(model, _ATTRIBUTE, tuple(recorded))


def model_source(model: nn.Module) -> dict | None:
    """``{"file", "entry", "dtype"}`` of the model file ``model`` was loaded from, if any."""
    return getattr(model, _SOURCE, None)


def set_model_source(model: nn.Module, source: dict | None) -> None:
    object.__setattr__(model, _SOURCE, source)


class UnrecordableInput(TypeError):
    """An example input that is neither a tensor nor a plain Python value."""


def input_spec(value) -> dict:
    """A JSON description of an example input: tensors by shape and dtype, containers recursively."""
    if isinstance(value, Tensor):
        return {"tensor": {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}}
    if isinstance(value, (tuple, list)):  # a namedtuple is recorded, and comes back, as a tuple
        return {"list" if isinstance(value, list) else "tuple": [input_spec(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: input_spec(v) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise UnrecordableInput(f"an example input of type {type(value).__name__} cannot be recorded")


def inputs_from_spec(spec: dict, device: torch.device | str = "cpu"):
    """Example inputs of the recorded shapes and dtypes: zeros (``True`` for bool tensors)."""
    (kind, body), = spec.items()
    if kind == "tensor":
        dtype = getattr(torch, body["dtype"])
        make = torch.ones if dtype == torch.bool else torch.zeros
        return make(body["shape"], dtype=dtype, device=device)
    if kind in ("tuple", "list"):
        items = [inputs_from_spec(s, device) for s in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: inputs_from_spec(s, device) for k, s in body.items()}
    return body
