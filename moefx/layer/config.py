"""``MoEConfig``: every option of a moefx MoE layer, frozen and validated on construction."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from fractions import Fraction
from types import SimpleNamespace

from moefx.layer.activations import ACTIVATIONS

GATES = ("topk", "switch", "gshard", "noisy_topk", "sigmoid", "expert_choice")
# (renormalize, softmax_first) of each gate: topk's are defaults, the others' are fixed by the method
# (sigmoid's renormalize is a default too; it has no softmax, so softmax_first stays None).
GATE_ROUTING = {
    "topk": (True, True), "switch": (False, True), "gshard": (True, True), "noisy_topk": (True, False),
    "sigmoid": (True, None), "expert_choice": (False, True),
}
# Expert choice's capacity_factor when unset: C = ceil(T * top_k / E), each expert the mean load of
# token-choice top-k, so the same expert compute (the paper's EC-CF2 is top_k=2 at 1.0).
EXPERT_CHOICE_CAPACITY = 1.0
GATE_FREE_OPTIONS = {"topk": ("renormalize", "softmax_first"), "sigmoid": ("renormalize",)}
# Switch Transformer's default multiplicative input jitter.
SWITCH_JITTER = 0.01


class InvalidOption(ValueError):
    """A bad option: its ``field``, ``value``, what is ``allowed`` and, for a value out of a numeric
    range, the range's ``bounds`` ``(low, high)`` (None: no limit), for callers that word it their way."""

    def __init__(self, message: str, *, field: str, value: object, allowed: str, bounds: tuple | None = None) -> None:
        super().__init__(message)
        self.field, self.value, self.allowed, self.bounds = field, value, allowed, bounds


def _require(ok: bool, field: str, value: object, allowed: str, bounds: tuple | None = None) -> None:
    if not ok:
        raise InvalidOption(f"MoEConfig.{field}={value!r} is invalid: {allowed}", field=field, value=value,
                            allowed=allowed, bounds=bounds)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Options of one MoE layer.

    Routing: ``gate`` picks the router. ``topk`` is token-choice top-k over a softmax, with
    ``renormalize`` (divide the top-k weights by their sum; default True) and ``softmax_first``
    (softmax over all experts before top-k, or over the k chosen logits after it; default True);
    the other gates fix both (``GATE_ROUTING``) and refuse a value that contradicts them.
    ``switch`` is top-1 with input jitter (``router_jitter``, default 0.01 for switch, 0
    otherwise), ``gshard`` top-2 with the second expert kept at random in training with
    probability 2·w2, ``noisy_topk`` adds learned Gaussian noise to the logits in training.
    ``sigmoid`` is DeepSeek-V3's router: sigmoid scores, experts chosen on score + a per-expert
    bias (the router's ``score_bias`` buffer), weighted by their scores (renormalised by default);
    ``expert_groups`` splits the experts into equal groups and ``topk_groups`` limits each token to
    the groups with the best top-2 score sums (node-limited routing); ``bias_update_rate`` is the
    step of the auxiliary-loss-free balancing that ``moefx.update_routing_bias`` applies.
    ``expert_choice`` (Zhou et al. 2022) turns the choice around: each expert takes the C tokens of
    the batch with the highest softmax score for it, C = ceil(capacity_factor * tokens * top_k /
    num_experts), weighted by that score (not renormalised); ``capacity_factor`` defaults to 1.0
    there (the compute of token-choice top-k). It ranks the whole batch, later tokens included: for
    encoders and training, not for models that generate (moefy refuses them).
    ``capacity_factor=None`` is dropless; a number caps
    every expert at ``ceil(capacity_factor * tokens * top_k / num_experts)`` slots per forward.
    ``routed_scale`` multiplies the routed experts' combined output (the ``split`` init sets it
    to ``num_experts``). ``num_shared_experts`` adds always-on experts of ``d_hidden`` each.
    ``router_bias`` adds a learned bias to the router logits (GPT-OSS); ``shared_expert_gate`` weighs
    the shared experts' output by ``sigmoid(x · w)`` per token (Qwen2-MoE).
    ``feature_axis`` is the input's axis of ``d_model`` features: -1 (``..., D``), or 1 for the
    channels-first input of 1x1 convolutions (``N, D, H, W``; moefy sets it).
    """

    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int = 2
    activation: str | Callable = "silu"
    gated: bool = True
    bias: bool = False
    gate: str = "topk"
    renormalize: bool | None = None
    softmax_first: bool | None = None
    router_jitter: float | None = None
    capacity_factor: float | None = None
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    routed_scale: float = 1.0
    num_shared_experts: int = 0
    feature_axis: int = -1
    expert_groups: int = 1
    topk_groups: int | None = None
    bias_update_rate: float = 0.0
    router_bias: bool = False
    shared_expert_gate: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "must be an integer >= 1")
        self._check_layer_fields()

    def _check_layer_fields(self) -> None:
        """The checks of every field but the sizes (``check_layer_options`` runs them alone)."""
        _require(_is_int(self.num_experts) and self.num_experts >= 1, "num_experts", self.num_experts,
                 "must be an integer >= 1")
        _require(
            _is_int(self.top_k) and 1 <= self.top_k <= self.num_experts,
            "top_k", self.top_k, f"must be an integer in [1, num_experts={self.num_experts}]",
            bounds=(1, self.num_experts),
        )
        for name in ("gated", "bias", "router_bias", "shared_expert_gate"):
            value = getattr(self, name)
            _require(isinstance(value, bool), name, value, "must be True or False")
        _require(
            callable(self.activation) or (isinstance(self.activation, str) and self.activation in ACTIVATIONS),
            "activation", self.activation, f"must be one of {sorted(ACTIVATIONS)} or a row-wise callable",
        )
        _require(isinstance(self.gate, str) and self.gate in GATES, "gate", self.gate, f"must be one of {list(GATES)}")
        self._resolve_routing()
        if self.gate == "switch":
            _require(self.top_k == 1, "top_k", self.top_k, "must be 1 for gate='switch'")
        if self.gate == "gshard":
            _require(self.top_k == 2, "top_k", self.top_k, "must be 2 for gate='gshard'")
        if self.gate == "expert_choice" and self.capacity_factor is None:
            object.__setattr__(self, "capacity_factor", EXPERT_CHOICE_CAPACITY)
        if self.capacity_factor is not None:
            allowed = "must be None (dropless) or a number > 0"
            _require(_is_int(self.capacity_factor) or isinstance(self.capacity_factor, float),
                     "capacity_factor", self.capacity_factor, allowed)
            _require(self.capacity_factor > 0, "capacity_factor", self.capacity_factor, allowed, bounds=(0, None))
            _require(math.isfinite(self.capacity_factor), "capacity_factor", self.capacity_factor, allowed)
            ratio = Fraction(str(self.capacity_factor))
            object.__setattr__(self, "_capacity_ratio", (ratio.numerator, ratio.denominator))
        if self.router_jitter is not None:
            _require(
                _is_number(self.router_jitter) and 0 <= self.router_jitter < 1,
                "router_jitter", self.router_jitter, "must be None (the gate's default) or a number in [0, 1)",
            )
        for name in ("load_balance_coef", "z_loss_coef"):
            value = getattr(self, name)
            _require(_is_number(value) and value >= 0, name, value, "must be a finite number >= 0")
        _require(
            _is_number(self.routed_scale) and self.routed_scale > 0, "routed_scale", self.routed_scale,
            "must be a finite number > 0",
        )
        _require(
            _is_int(self.num_shared_experts) and self.num_shared_experts >= 0,
            "num_shared_experts", self.num_shared_experts, "must be an integer >= 0",
        )
        _require(
            _is_int(self.feature_axis) and self.feature_axis in (-1, 1), "feature_axis", self.feature_axis,
            "must be -1 (features last) or 1 (channels first)",
        )
        self._check_sigmoid_options()

    def _check_sigmoid_options(self) -> None:
        """Group-limited routing and the balancing bias belong to the sigmoid gate."""
        _require(
            _is_int(self.expert_groups) and self.expert_groups >= 1 and self.num_experts % self.expert_groups == 0,
            "expert_groups", self.expert_groups, f"must be an integer >= 1 that divides num_experts={self.num_experts}",
        )
        if self.topk_groups is None:
            object.__setattr__(self, "topk_groups", self.expert_groups)
        _require(
            _is_int(self.topk_groups) and 1 <= self.topk_groups <= self.expert_groups, "topk_groups", self.topk_groups,
            f"must be None (every group) or an integer in [1, expert_groups={self.expert_groups}]",
        )
        reachable = self.topk_groups * (self.num_experts // self.expert_groups)
        _require(
            self.top_k <= reachable, "top_k", self.top_k,
            f"must be at most the {reachable} experts of the topk_groups={self.topk_groups} groups a token may use",
        )
        _require(
            _is_number(self.bias_update_rate) and self.bias_update_rate >= 0, "bias_update_rate",
            self.bias_update_rate, "must be a finite number >= 0",
        )
        if self.gate != "sigmoid":
            for name, off in (("expert_groups", 1), ("topk_groups", self.expert_groups), ("bias_update_rate", 0)):
                _require(getattr(self, name) == off, name, getattr(self, name), "needs gate='sigmoid'")

    def _resolve_routing(self) -> None:
        """Fill ``renormalize``/``softmax_first`` from the gate; a gate fixes those it does not leave free."""
        for name, implied in zip(("renormalize", "softmax_first"), GATE_ROUTING[self.gate]):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, implied)
                continue
            _require(isinstance(value, bool), name, value, "must be None (the gate's default), True or False")
            if implied is None:
                _require(False, name, value, f"gate={self.gate!r} has no softmax: leave {name} unset")
            if name not in GATE_FREE_OPTIONS.get(self.gate, ()):
                _require(value == implied, name, value, f"gate={self.gate!r} uses {name}={implied}")

    @property
    def jitter(self) -> float:
        if self.router_jitter is not None:
            return self.router_jitter
        return SWITCH_JITTER if self.gate == "switch" else 0.0

    def capacity(self, num_tokens: int) -> int | None:
        """Slots each expert keeps per forward, or None when dropless."""
        if self.capacity_factor is None:
            return None
        # Integer arithmetic on the factor as written (1.1 * 50 * 2 / 10 is 11, where floats give
        # ceil(11.000000000000002) = 12); it also traces under torch.compile with symbolic tokens.
        numerator, denominator = self._capacity_ratio
        return -(-(numerator * num_tokens * self.top_k) // (denominator * self.num_experts))


class _LayerFields(SimpleNamespace):
    """MoEConfig's fields but the sizes, checked by MoEConfig's own methods (``check_layer_options``)."""

    _check_layer_fields = MoEConfig._check_layer_fields
    _resolve_routing = MoEConfig._resolve_routing
    _check_sigmoid_options = MoEConfig._check_sigmoid_options


def check_layer_options(**options) -> dict:
    """MoEConfig's checks of ``options`` (its fields but the sizes ``d_model`` and ``d_hidden``, which a
    converter takes from each FFN; the others at their defaults; ``num_experts`` is needed), with no
    layer config built: a bad value raises ``InvalidOption``, an unknown name ``TypeError``. Returns
    the fields but the sizes, resolved as MoEConfig resolves them (the gate's defaults filled in)."""
    defaults = {f.name: f.default for f in fields(MoEConfig) if f.name not in ("d_model", "d_hidden")}
    unknown = sorted(options.keys() - defaults.keys())
    if unknown:
        raise TypeError(f"MoEConfig has no field {', '.join(map(repr, unknown))} (its fields are {list(defaults)})")
    if "num_experts" not in options:
        raise TypeError("check_layer_options() needs num_experts")
    checked = _LayerFields(**{**defaults, **options})
    checked._check_layer_fields()
    return {name: getattr(checked, name) for name in defaults}
