"""``ConversionOptions``: moefy's options, frozen, keyword-only, checked once, and recorded as JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest

from moefx.layer.config import InvalidOption
from moefx.passes.driver import ConversionOptions, conversion_options


def test_frozen_and_keyword_only():
    options = ConversionOptions(num_experts=4, top_k=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.top_k = 2
    with pytest.raises(TypeError):
        ConversionOptions(4, 1)
    with pytest.raises(TypeError):  # the MoE layer options are read-only too
        options.moe_options["expert_groups"] = 2
    sigmoid = ConversionOptions(num_experts=4, gate="sigmoid", include=["a.*"], moe_options={"expert_groups": 2})
    assert sigmoid.include == ("a.*",)
    assert copy.deepcopy(sigmoid) == sigmoid and pickle.loads(pickle.dumps(sigmoid)) == sigmoid


BAD = [
    (dict(num_experts=1), "num_experts", r"num_experts=1 is invalid: .*>= 2 experts"),
    (dict(num_experts=4, top_k=5), "top_k", r"top_k=5 is invalid: .*\[1, num_experts=4\]"),
    (dict(gate="switch"), "top_k", r"top_k=2 is invalid: must be 1 for gate='switch'"),
    (dict(gate="magic"), "gate", r"gate='magic' is invalid: must be one of \['topk'"),
    (dict(capacity_factor=0.0), "capacity_factor", r"capacity_factor=0.0 is invalid: .*> 0"),
    (dict(every=0), "every", r"every=0 is invalid: .*>= 1"),
    (dict(init="magic"), "init", r"init='magic' is unknown: must be one of \['upcycle'"),
    (dict(split_by="random"), "split_by", r"split_by='random' is unknown: must be one of \['contiguous', 'kmeans'\]"),
    (dict(moe_options={"expert_groups": 2}), "expert_groups", r"expert_groups=2 is invalid: needs gate='sigmoid'"),
    (dict(moe_options={"routed_scale": -1.0}), "routed_scale", r"routed_scale=-1.0 is invalid: .*> 0"),
    (dict(moe_options={"feature_axis": 1}), "feature_axis", r"feature_axis is not an option of moefy"),
    (dict(moe_options={"d_hidden": 8}), "d_hidden", r"d_hidden: not options of moefy"),
]


@pytest.mark.parametrize("given,field,message", BAD, ids=[f for _, f, _ in BAD])
def test_a_bad_value_is_named_with_what_is_allowed(given, field, message):
    with pytest.raises(InvalidOption, match=message) as raised:
        ConversionOptions(**given)
    assert isinstance(raised.value, ValueError) and raised.value.field == field


def test_range_errors_carry_their_bounds():
    with pytest.raises(InvalidOption) as raised:
        ConversionOptions(num_experts=4, top_k=7)
    assert (raised.value.value, raised.value.bounds) == (7, (1, 4))
    with pytest.raises(InvalidOption) as raised:
        ConversionOptions(gate="switch")
    assert raised.value.bounds is None  # a rule of the gate, not a range


def test_unknown_layer_options_and_bad_globs_are_type_errors():
    with pytest.raises(TypeError, match="MoEConfig has no field 'magic'"):
        ConversionOptions(moe_options={"magic": 1})
    with pytest.raises(TypeError, match="include=3 must be a glob"):
        ConversionOptions(include=3)


def test_round_trip_through_the_recorded_json():
    options = conversion_options(
        num_experts=8, top_k=2, gate="sigmoid", capacity_factor=1.5, include=["layers.*"], every=2,
        expert_groups=4, bias_update_rate=0.001,
    )
    data = options.as_dict()
    assert data == {  # moefx.json's form: flat, the MoE layer options among the fields
        "num_experts": 8, "top_k": 2, "init": "upcycle", "gate": "sigmoid", "capacity_factor": 1.5,
        "include": ["layers.*"], "exclude": None, "every": 2, "drop_fraction": 0.5, "split_by": "contiguous",
        "router_init": "random", "seed": 0, "expert_groups": 4, "bias_update_rate": 0.001,
    }
    assert ConversionOptions.from_dict(json.loads(json.dumps(data))) == options
    assert ConversionOptions.from_dict({"num_experts": 4}) == ConversionOptions(num_experts=4)  # defaults fill in
    with pytest.raises(InvalidOption, match="top_k=3"):  # a record is checked as it is read
        ConversionOptions.from_dict({**data, "top_k": 3, "expert_groups": 8, "topk_groups": 1})
