"""A model case converted and saved, with its dense structure on the meta device: the starting
point of the tests that load (``moefx.load``) or stream (``moefx.offload``) a saved model."""

from __future__ import annotations

from pathlib import Path

import torch

import moefx


def convert_and_save(case, out: Path, init: str):
    """``(converted model, args, kwargs, dense model on meta)``: ``case``'s model (seed 0, eval
    mode) converted to 4 experts, top-2, and saved to ``out``."""
    torch.manual_seed(0)
    model = case.build().eval()
    args, kwargs = case.inputs()
    moefx.moefy(model, num_experts=4, top_k=2, init=init, example_inputs=args, example_kwargs=kwargs)
    moefx.save(model, out)
    with torch.device("meta"):
        dense = case.build()
    return model, args, kwargs, dense
