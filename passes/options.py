"""``ConversionOptions``: moefy's options in one frozen object, checked once on construction.

    ConversionOptions(num_experts=8, top_k=2, gate="sigmoid", moe_options={"expert_groups": 2})

Built by ``moefy`` from its keywords, by the CLI from its flags and by ``moefx.load`` from the
record (``from_dict``); ``as_dict`` is what ``moefx.json`` holds: the fields flat, the MoE layer
options among them. A bad value raises ``InvalidOption`` (a ``ValueError``) naming the field, the
value and what is allowed; the MoE layer's own limits are ``MoEConfig``'s (``check_layer_options``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from moefx.init.router_init import ROUTER_INITS, default_router_init
from moefx.init.strategies import INIT_STRATEGIES, SPLIT_METHODS
from moefx.layer.config import InvalidOption, check_layer_options

# MoEConfig fields each MoE takes from the FFN it replaces, not from the options.
FROM_FFN = ("d_model", "d_hidden", "activation", "gated", "bias")
MIN_EXPERTS = 2


@dataclass(frozen=True, kw_only=True)
class ConversionOptions:
    """What ``moefy`` converts and how: ``num_experts``, ``top_k``, ``init``, ``gate``,
    ``capacity_factor`` (None: dropless), the FFNs chosen (``include``/``exclude`` globs, ``every``),
    the init's ``drop_fraction`` and ``split_by``, ``router_init`` (``random``, ``weights`` or ``kmeans``;
    None: the init's default, filled in), and ``moe_options``: further ``MoEConfig`` fields
    given to every MoE layer (read-only)."""

    num_experts: int = 8
    top_k: int = 2
    init: str = "upcycle"
    gate: str = "topk"
    capacity_factor: float | None = None
    include: str | tuple[str, ...] | None = None
    exclude: str | tuple[str, ...] | None = None
    every: int = 1
    drop_fraction: float = 0.5
    split_by: str = "contiguous"
    router_init: str | None = None  # None: the init's default (moefx.init.router_init.default_router_init)
    seed: int = 0  # each layer's random parts (router, drop-upcycle) from a generator seeded by this and its path
    moe_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):  # a list of globs is kept as a tuple: the options are frozen
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "moe_options", MappingProxyType(dict(self.moe_options)))
        _known("init", self.init, INIT_STRATEGIES)
        _known("split_by", self.split_by, SPLIT_METHODS)
        if "feature_axis" in self.moe_options:
            raise InvalidOption(
                "feature_axis is not an option of moefy: it is read from each FFN (1 for 1x1 convolutions)",
                field="feature_axis", value=self.moe_options["feature_axis"], allowed="not an option of moefy",
            )
        from_ffn = sorted(self.moe_options.keys() & set(FROM_FFN))
        if from_ffn:
            raise InvalidOption(
                f"{', '.join(from_ffn)}: not options of moefy; each MoE takes them from the FFN it replaces",
                field=from_ffn[0], value=self.moe_options[from_ffn[0]], allowed="not an option of moefy",
            )
        n = self.num_experts
        if not (isinstance(n, int) and n >= MIN_EXPERTS):
            allowed = f"an MoE layer needs an integer >= {MIN_EXPERTS} experts"
            raise InvalidOption(f"num_experts={n!r} is invalid: {allowed}", field="num_experts", value=n,
                                allowed=allowed, bounds=(MIN_EXPERTS, None))
        check_layer_options(num_experts=n, top_k=self.top_k, gate=self.gate, capacity_factor=self.capacity_factor,
                            **self.moe_options)
        if self.router_init is None:
            object.__setattr__(self, "router_init", default_router_init(self.init, self.top_k, self.num_experts))
        _known("router_init", self.router_init, ROUTER_INITS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            allowed = "it must be an integer >= 0"
            raise InvalidOption(f"seed={self.seed!r} is invalid: {allowed}", field="seed", value=self.seed,
                                allowed=allowed, bounds=(0, None))
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            allowed = "it must be an integer >= 1 (1 converts every FFN)"
            raise InvalidOption(f"every={self.every!r} is invalid: {allowed}", field="every", value=self.every,
                                allowed=allowed, bounds=(1, None))
        from moefx.passes.plan import plan  # its checks of the globs (a TypeError)

        plan((), include=self.include, exclude=self.exclude)

    def as_dict(self) -> dict:
        """The options as ``moefx.json`` records them: JSON values, the MoE layer options among the fields."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "moe_options"}
        for name in ("include", "exclude"):
            if isinstance(data[name], tuple):
                data[name] = list(data[name])
        return {**data, **self.moe_options}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConversionOptions:
        """The options of ``as_dict`` (or of a ``moefx.json``), checked: the names that are not fields
        are MoE layer options; a field left out takes its default."""
        own = {f.name for f in fields(cls)} - {"moe_options"}
        return cls(**{k: v for k, v in data.items() if k in own},
                   moe_options={k: v for k, v in data.items() if k not in own})

    def __reduce__(self):  # copy and pickle through the record's form (a mapping proxy has neither)
        return type(self).from_dict, (self.as_dict(),)


def _known(name: str, value: object, choices) -> None:
    if value not in choices:
        allowed = f"must be one of {list(choices)}"
        raise InvalidOption(f"{name}={value!r} is unknown: {allowed}", field=name, value=value, allowed=allowed)
