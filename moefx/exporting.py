"""``moefx.export``: hand a converted model to deployment tools.

    pt2       torch.export's ExportedProgram, saved with torch.export.save; the moefx ops are
              single nodes. Load: ``torch.export.load(path).module()``.
    aoti      AOTInductor: the program compiled ahead of time into a .pt2 package.
              Load: ``torch._inductor.aoti_load_package(path)``.
    tensorrt  Torch-TensorRT's dynamo path on a CUDA GPU: TensorRT engines for what it can take,
              the moefx ops left to PyTorch (``torch_executed_ops``). Load: ``import torch_tensorrt``, then
              ``torch.export.load(path).module()``.

In all three the moefx ops stay calls into torch's dispatcher (AOTInductor calls them through its
proxy executor), so the process that runs an exported model must ``import moefx`` first, which
registers them; without it, loading fails on the unknown ``moefx::`` ops.

Made for loading with ``import moefx`` alone (no other import):
- outputs: a transformers ``ModelOutput`` (or any other ``dict`` subclass) is returned as a plain
  ``dict`` (``out["logits"]``); its class would otherwise have to be imported before loading, since
  the saved program names it. A model whose config has ``use_cache=True`` is exported with
  ``use_cache=False`` (restored afterwards): a KV cache is no tensor output.
- shapes: integer (or bool) inputs of rank 2, token ids and attention masks, get a dynamic batch
  and sequence dimension (``Dim.AUTO``); where torch.export has to fix one (the model's code
  specializes it, or the dynamic export fails) it is exported at the example's size with a
  ``StaticShapeWarning``. Every other input keeps the example's shape. ``tensorrt`` is static.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from moefx.kernels import FORWARD_OPS
from moefx.model import is_offloaded
from moefx.passes.forward_override import forward_override

FORMATS = ("pt2", "aoti", "tensorrt")
# Left to PyTorch by TensorRT: its converters do not know them (a plugin per op would be the next step).
MOEFX_OPS = tuple(f"torch.ops.moefx.{op}.default" for op in FORWARD_OPS)


class ExportError(RuntimeError):
    """A model or format moefx.export cannot produce."""


class StaticShapeWarning(UserWarning):
    """A token input's batch or sequence dimension could not be made dynamic: the program takes only
    the example's size there."""


def export(model: nn.Module, path: str | Path, *, example_inputs: tuple, example_kwargs: dict | None = None,
           format: str = "pt2", dynamic: bool | None = None) -> Path:
    """Export the converted ``model`` as ``format`` to ``path`` (written atomically); returns the path.
    ``example_inputs``/``example_kwargs`` are the forward's arguments, on the device to export for.
    ``dynamic`` (default: True except for tensorrt) makes the batch and sequence dimensions of
    integer rank-2 inputs dynamic. The program returns tensors, tuples, lists and plain dicts (a
    transformers output as a dict), so loading it needs ``import moefx`` and nothing else."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is unknown: must be one of {list(FORMATS)}")
    if is_offloaded(model):
        raise ExportError("an offloaded model streams its experts at run time and cannot be exported: export it before moefx.offload")
    path = Path(path)
    if format == "tensorrt":
        _check_tensorrt(example_inputs)
    if dynamic is None:
        dynamic = format != "tensorrt"  # TensorRT engines would need min/opt/max shapes: not done yet
    model.eval()
    with torch.no_grad(), forward_override(model, _exportable_output), _no_kv_cache(model):
        program = _export_program(model, tuple(example_inputs), example_kwargs or {}, dynamic)
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


def _export_program(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool):
    """torch.export's program, token inputs' batch and sequence dimensions dynamic where it can."""
    token_inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if is_token_input(t)]
    if not dynamic or not token_inputs:
        return torch.export.export(model, args, kwargs, strict=False)
    shapes = torch.export.ShapesCollection()
    for t in token_inputs:
        shapes[t] = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    try:
        program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes.dynamic_shapes(model, args, kwargs),
                                      strict=False)
    except ExportError:
        raise
    except Exception as err:  # some models cannot trace symbolic sizes: the example's shapes still export
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        warnings.warn(f"dynamic batch and sequence dimensions failed to export ({reason[:200]}): exported with the "
                      "example inputs' shapes, the only ones the program accepts", StaticShapeWarning, stacklevel=3)
        return torch.export.export(model, args, kwargs, strict=False)
    _warn_static_token_dims(program)
    return program


def is_token_input(x) -> bool:
    """Token ids or a mask: an integer or bool tensor (batch, sequence)."""
    return isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() and not x.is_complex()


def _warn_static_token_dims(program) -> None:
    """One warning naming each token input dimension torch.export fixed to the example's size."""
    user_inputs = set(program.graph_signature.user_inputs)
    fixed = []
    for node in program.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" and node.name in user_inputs else None
        if is_token_input(value):
            for dim, name in enumerate(("batch", "sequence")):
                if is_concrete_int(value.shape[dim]):  # a SymInt torch.export specialized is concrete too
                    fixed.append((node.name, name, value.shape[dim]))
    if fixed:
        small = any(size <= 1 for *_, size in fixed)
        warnings.warn(
            "torch.export fixed " + ", ".join(f"the {name} size of {arg} to {size}" for arg, name, size in fixed)
            + (" (a size of 0 or 1 is always fixed: give example inputs with batch and sequence of 2 or more)" if small
               else " (the model's code specializes it)")
            + ": the program accepts only that size there", StaticShapeWarning, stacklevel=4)


@contextmanager
def _no_kv_cache(model: nn.Module):
    """transformers configs with ``use_cache=True`` set to False for the export (a KV cache is no tensor
    output), put back afterwards; an explicit ``use_cache=True`` argument still wins (and is refused)."""
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", None) is True}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _plain_output(output):
    """``output`` with every ``dict`` subclass (transformers' ``ModelOutput``) made a plain dict, which a
    saved program can name without the subclass's module being imported at load time."""
    if isinstance(output, dict):
        return {k: _plain_output(v) for k, v in output.items()}
    if type(output) in (tuple, list):
        return type(output)(_plain_output(v) for v in output)
    return output


def _exportable_output(output):
    """``output`` as plain containers if a saved program can return it; else an error that names what it holds."""
    output = _plain_output(output)
    leaves = torch.utils._pytree.tree_leaves(output)
    returnable = (torch.Tensor, int, float, bool, str, type(None))
    odd = sorted({type(x).__name__ for x in leaves if not isinstance(x, returnable)})
    if odd:
        raise ExportError(
            f"the model's output holds {', '.join(odd)}, which an exported program cannot return: make the forward "
            "return tensors (for a transformers model, drop use_cache=True from the example inputs: moefx exports "
            "it with use_cache=False)"
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
