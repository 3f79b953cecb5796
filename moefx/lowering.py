"""``moefx.export``: hand a converted model to deployment tools.

    pt2       torch.export's ExportedProgram, saved with torch.export.save; the moefx ops are
              single nodes. Load: ``torch.export.load(path).module()``.
    aoti      AOTInductor: the program compiled ahead of time into a .pt2 package.
              Load: ``torch._inductor.aoti_load_package(path)``.
    tensorrt  Torch-TensorRT's dynamo path on a CUDA GPU: TensorRT engines for what it can take,
              the moefx ops left to PyTorch (``torch_executed_ops``). Load: ``torch.export.load``.

In all three the moefx ops stay calls into torch's dispatcher (AOTInductor calls them through its
proxy executor), so the process that runs an exported model must ``import moefx`` first, which
registers them; without it, loading fails on the unknown ``moefx::`` ops. Shapes are static:
the example inputs' shapes are the only ones the program accepts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moefx.forward_override import forward_override
from moefx.kernels import FORWARD_OPS
from moefx.offloaded_experts import is_offloaded

FORMATS = ("pt2", "aoti", "tensorrt")
# Left to PyTorch by TensorRT: its converters do not know them (a plugin per op would be the next step).
MOEFX_OPS = tuple(f"torch.ops.moefx.{op}.default" for op in FORWARD_OPS)


class ExportError(RuntimeError):
    """A model or format moefx.export cannot produce."""


def export(model: nn.Module, path: str | Path, *, example_inputs: tuple, example_kwargs: dict | None = None,
           format: str = "pt2") -> Path:
    """Export the converted ``model`` as ``format`` to ``path`` (written atomically); returns the path.
    ``example_inputs``/``example_kwargs`` are the forward's arguments, on the device to export for."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is unknown: must be one of {list(FORMATS)}")
    if is_offloaded(model):
        raise ExportError("an offloaded model streams its experts at run time and cannot be exported: export it before moefx.offload")
    path = Path(path)
    if format == "tensorrt":
        _check_tensorrt(example_inputs)
    model.eval()
    with torch.no_grad(), forward_override(model, _exportable_output):
        program = torch.export.export(model, tuple(example_inputs), example_kwargs or {}, strict=False)
    # AOTInductor insists on a .pt2 name, so the partial file keeps the suffix.
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        if format == "pt2":
            torch.export.save(program, partial)
        elif format == "aoti":
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
        else:
            _save_tensorrt(program, example_inputs, example_kwargs, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _exportable_output(output):
    """``output`` unchanged if a saved program can return it; else an error that names what it holds."""
    leaves = torch.utils._pytree.tree_leaves(output)
    returnable = (torch.Tensor, int, float, bool, str, type(None))
    odd = sorted({type(x).__name__ for x in leaves if not isinstance(x, returnable)})
    if odd:
        raise ExportError(
            f"the model's output holds {', '.join(odd)}, which an exported program cannot return: make the forward "
            "return tensors (for a transformers model, set config.use_cache=False or pass use_cache=False in "
            "example_kwargs)"
        )
    return output


def _check_tensorrt(example_inputs: tuple) -> None:
    try:
        import torch_tensorrt
    except ImportError as err:
        raise ExportError(
            "format 'tensorrt' needs torch_tensorrt, built for this torch "
            f"({torch.__version__.split('+')[0]}) and a CUDA GPU: pip install 'moefx[tensorrt]'"
        ) from err
    ours, theirs = torch.__version__.split(".")[:2], torch_tensorrt.__version__.split(".")[:2]
    if ours != theirs:
        raise ExportError(
            f"torch_tensorrt {torch_tensorrt.__version__} is built for torch {'.'.join(theirs)}, but this is torch "
            f"{torch.__version__}: install the torch_tensorrt release that matches torch"
        )
    if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        raise ExportError("format 'tensorrt' builds engines for a CUDA GPU: put the model and its inputs on cuda")


def _save_tensorrt(program, example_inputs: tuple, example_kwargs: dict | None, path: Path) -> None:
    import torch_tensorrt

    compiled = torch_tensorrt.dynamo.compile(
        program, arg_inputs=list(example_inputs), kwarg_inputs=example_kwargs or {},
        torch_executed_ops=set(MOEFX_OPS),
    )
    torch_tensorrt.save(compiled, str(path), output_format="exported_program", arg_inputs=list(example_inputs),
                        kwarg_inputs=example_kwargs or {})
