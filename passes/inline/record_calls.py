"""record_calls: the arguments each module got when the model ran on the example inputs.

    record_calls(model, ["blocks.0"], (x,), {})  ─▶  {"blocks.0": [((h,), {"mask": None}), ...]}

The traces are checked against these calls (``check``), and the arguments that were constant in
them are fixed when the module is traced (``trace``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from moefx.passes.capture import inputs_to_run

log = logging.getLogger(__name__)

Call = tuple[tuple, dict]  # (args, kwargs) of one call


def record_calls(model: nn.Module, paths: list[str], args, kwargs) -> dict[str, list[Call]]:
    """The arguments of each call of each module when the model ran on the example inputs (in
    eval mode, without gradients; every mode is put back). Empty without example inputs, or when
    the run fails (a warning says so)."""
    if args is None and kwargs is None:
        return {}
    args, kwargs = inputs_to_run(model, args, kwargs)
    calls = {}

    def recorder(path: str):
        def record(module, call_args, call_kwargs):
            calls.setdefault(path, []).append(tree_map_only(torch.Tensor, torch.clone, (call_args, call_kwargs)))
        return record

    handles = [model.get_submodule(p).register_forward_pre_hook(recorder(p), with_kwargs=True) for p in paths]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*(args or ()), **(kwargs or {}))
    except Exception as err:
        log.warning("running %s to check the inline FFNs' traces failed (%s): they are not checked",
                    type(model).__name__, err)
        calls.clear()
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.train(mode)
    return calls
