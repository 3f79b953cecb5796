"""The calibration forward of ``router_init="kmeans"``: which inputs it runs, checked before the
conversion changes anything, and the run itself on the converted model (``moefx.init.router_init``).

    moefy(model, router_init="kmeans", calibration=ids_BT)
      before rewrite: the dense model runs on ``ids_BT`` (a refusal is reported, nothing changed)
      after rewrite:  one forward; each new MoE's router is set from the hidden states reaching it
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from moefx.init.router_init import CalibrationInputs, kmeans_routers_

log = logging.getLogger(__name__)


def calibration_inputs(router_init: str, calibration, example_inputs, example_kwargs) -> CalibrationInputs | None:
    """The inputs ``kmeans`` runs on: ``calibration`` (a tensor: the one positional argument; a tuple:
    the positional arguments; or a ``CalibrationInputs``), else the example inputs. None when the
    router init needs no forward."""
    if router_init != "kmeans":
        if calibration is not None:
            raise ValueError(
                f"calibration= is only read by router_init='kmeans' (got router_init={router_init!r}): "
                "pass router_init='kmeans', or leave calibration out"
            )
        return None
    if calibration is None:
        if example_inputs is None and example_kwargs is None:
            raise ValueError(
                "router_init='kmeans' clusters the hidden states of a forward, but neither calibration= nor "
                "example_inputs= was given: pass calibration= (the forward's inputs, e.g. token ids)"
            )
        args = example_inputs if isinstance(example_inputs, tuple) else (() if example_inputs is None else (example_inputs,))
        return CalibrationInputs(args=args, kwargs=dict(example_kwargs or {}), source="example inputs")
    if isinstance(calibration, CalibrationInputs):
        return calibration
    if isinstance(calibration, Tensor):
        return CalibrationInputs(args=(calibration,), source=f"calibration inputs ({_shape(calibration)})")
    if isinstance(calibration, tuple):
        shapes = ", ".join(_shape(a) for a in calibration if isinstance(a, Tensor))
        return CalibrationInputs(args=calibration, source=f"calibration inputs ({shapes})")
    raise TypeError(
        f"calibration= must be a tensor (the forward's one positional argument), a tuple of positional arguments "
        f"or a moefx.init.router_init.CalibrationInputs, got {type(calibration).__name__}"
    )


def check_calibration(model: nn.Module, inputs: CalibrationInputs | None) -> None:
    """Run the dense model on calibration inputs that are not the example inputs (those were run by
    capture already), so that a forward refusing them fails before anything is converted."""
    if inputs is None or inputs.source == "example inputs" or _on_meta(model):
        return
    try:
        kmeans_routers_(model, [], lambda: model(*inputs.args, **inputs.kwargs))
    except Exception as err:
        raise ValueError(
            f"{type(model).__name__}'s forward fails on the calibration inputs ({type(err).__name__}: {err}); "
            "nothing converted: give inputs its forward accepts (token ids of shape [batch, sequence] for a "
            "language model)"
        ) from err


def calibrate_routers(model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: CalibrationInputs | None) -> str | None:
    """Set the routers of ``layers`` from one forward on ``inputs``; the source recorded with the
    conversion (None when there was nothing to do)."""
    if inputs is None:
        return None
    if _on_meta(model):  # a dry run on meta tensors: no values to cluster
        return inputs.source
    reached = kmeans_routers_(model, layers, lambda: model(*inputs.args, **inputs.kwargs))
    missed = [path for path, _ in layers if path not in reached]
    if missed:
        log.warning("router_init='kmeans': the calibration forward never reached %s; their routers stay random", missed)
    return inputs.source


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) + f" {str(t.dtype).removeprefix('torch.')}"

