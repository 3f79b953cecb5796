"""capture: an ``nn.Module`` to an FX graph whose nodes carry ``nn_module_stack``.

    model(x)  ──▶  graph():
                     %x = placeholder
                     %w = get_attr[target=mlp.up.weight]          (original parameter names)
                     %h = aten.linear(x, w)   {nn_module_stack: mlp → mlp.up}
                     ...

With example inputs the model is captured by ``torch.export`` (non-strict, in eval mode, the
mode restored after): an ATen graph with shapes. The graph is for analysis only, so its outputs
are the tensors found in the model's output (a transformers KV cache object, say, which
``torch.export`` cannot flatten, is left out). Without, by ``torch.fx.symbolic_trace``: a
torch-level graph, no shapes. If the chosen method fails, the other is tried (a warning says so);
if both fail, the error names the construct that failed and what to pass instead. When export
fails, the model first runs on the inputs: inputs it rejects are an error, since symbolic_trace,
which ignores them, would hide the mistake. A model on the meta device is
captured without memory (tensor inputs are moved to meta).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from moefx.layer.moe import MoE
from moefx.passes.forward_override import forward_override

log = logging.getLogger(__name__)
_THIS_FILE = os.path.realpath(__file__)  # its frames are moefx's, not the construct that failed


class CaptureError(RuntimeError):
    """The model could not be captured as a graph."""


@dataclass(frozen=True)
class Captured:
    graph_module: fx.GraphModule
    method: Literal["export", "symbolic_trace"]


class _Tracer(fx.Tracer):
    """symbolic_trace that keeps moefx layers whole (their forward checks shapes in Python)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, MoE) or super().is_leaf_module(m, qualname)


def trace_graph(module: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
    """``module``'s forward as torch.fx traces it symbolically, moefx layers kept whole (calls of
    them); ``concrete_args`` fixes those arguments, as in ``fx.Tracer.trace``."""
    return _Tracer().trace(module, concrete_args=concrete_args)


def on_meta(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are on the meta device (no values: shapes only)."""
    param = next(module.parameters(), None)
    return param is not None and param.device.type == "meta"


def capture(model: nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None) -> Captured:
    """The model's graph, for analysis; the model itself is left as it was."""
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    attempts = [_symbolic_trace] if example_inputs is None and example_kwargs is None else [_export, _symbolic_trace]
    failures, data_dependent = [], None
    for attempt in attempts:
        try:
            captured = attempt(model, example_inputs or (), example_kwargs or {})
        except Exception as err:
            log.debug("capture by %s failed", attempt.__name__, exc_info=True)
            failures.append(f"{attempt.__name__.lstrip('_')} failed at {_failing_frame(err)}: {_first_line(err)}")
            if attempt is _export:
                _check_the_model_runs(model, example_inputs or (), example_kwargs or {})
                if type(err).__name__ == "GuardOnDataDependentSymNode":
                    data_dependent = _failing_frame(err)
            continue
        if failures:
            log.warning("captured %s by symbolic_trace (no shapes): %s", type(model).__name__, failures[0])
        return captured
    if data_dependent is not None:  # the common case, said plainly: neither tracer follows a tensor's value
        raise CaptureError(
            f"cannot capture {type(model).__name__} as a graph: {data_dependent} depends on a tensor's values, "
            "which torch.export and symbolic_trace cannot follow. Compute both sides and pick with torch.where "
            "(or use torch.cond), or move that decision out of forward"
        )
    advice = (
        "pass example_inputs (a tuple of the forward's positional arguments) and example_kwargs so moefx can "
        "capture the model with torch.export"
        if example_inputs is None and example_kwargs is None
        else "check that model(*example_inputs, **example_kwargs) runs, and make the failing construct traceable "
        "(torch.export needs shapes it can reason about; see the torch.export docs on data-dependent control flow)"
    )
    raise CaptureError(f"cannot capture {type(model).__name__} as a graph:\n  " + "\n  ".join(failures) + f"\n{advice}")


def _export(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    if on_meta(model):
        args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
    was_training = model.training
    model.eval()
    try:
        with forward_override(model, _output_tensors), _quiet_torch():
            program = torch.export.export(model, args, kwargs, strict=False)
    finally:
        model.train(was_training)
    return Captured(program.module(), "export")


@contextlib.contextmanager
def _quiet_torch():
    """On a failure, export logs and prints whole graphs to stderr; the error moefx raises says what
    failed and where, and ``--debug`` logs the traceback, so that output is only noise."""
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(disabled)


def _check_the_model_runs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """After export failed: inputs the model itself rejects are the user's mistake, not a construct
    export cannot trace, and symbolic_trace (which ignores inputs) would hide it."""
    args, kwargs = inputs_to_run(model, args, kwargs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as err:
        frame = _innermost_frame(err)  # only this file's own left: it failed in torch's modules
        where = "" if frame is not None and _in_this_file(frame) else f" at {_failing_frame(err)}"
        raise CaptureError(
            f"{type(model).__name__} fails on the example inputs: model(*example_inputs, **example_kwargs) raised "
            f"{_first_line(err)}{where}; pass inputs its forward accepts"
        ) from err
    finally:
        model.train(was_training)


def inputs_to_run(model: nn.Module, args, kwargs):
    """The example inputs to run ``model`` on: on meta for a meta model, else copies, so a forward
    that updates its input in place leaves the caller's inputs as they were."""
    to_meta_or_copy = (lambda t: t.to("meta")) if on_meta(model) else torch.clone
    return torch.utils._pytree.tree_map_only(torch.Tensor, to_meta_or_copy, (args, kwargs))


def _output_tensors(output) -> tuple[torch.Tensor, ...]:
    """Every tensor in a forward's output, in order; mappings (transformers' ModelOutput), lists
    and tuples are walked, anything else is left out."""
    if isinstance(output, torch.Tensor):
        return (output,)
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return tuple(t for item in output for t in _output_tensors(item))
    return ()


def _symbolic_trace(model: nn.Module, args: tuple, kwargs: dict) -> Captured:
    graph = trace_graph(model)
    return Captured(fx.GraphModule(model, graph, type(model).__name__), "symbolic_trace")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _failing_frame(err: Exception) -> str:
    """The innermost frame outside torch, in words: the user's construct that failed."""
    f = _innermost_frame(err)
    if f is None:
        return "torch internals"
    return f"{f.filename}:{f.lineno} in {f.name} ({(f.line or '').strip()})"


def _innermost_frame(err: Exception) -> traceback.FrameSummary | None:
    """The innermost frame outside torch and outside this file (this file's own when only it is left)."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(torch_dir)]
    frames = [f for f in frames if not _in_this_file(f)] or frames
    return frames[-1] if frames else None


def _in_this_file(frame: traceback.FrameSummary) -> bool:
    return os.path.realpath(frame.filename) == _THIS_FILE
