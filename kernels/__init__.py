"""moefx's custom ops (``torch.ops.moefx.*``), registered with ``torch.library`` on import.

Each op module holds one op: its schema, fake (meta) implementation, autograd formula and the
default (CPU) implementation; ``reference.py`` holds slow, obviously-right versions for tests.
Device kernels (Triton on CUDA) register for their dispatch key beside the default. Call the ops
through ``torch.ops.moefx``: route, permute, grouped_linear, unpermute, all_to_all (expert parallelism),
and the fused forms a local layer runs: plan_dispatch (permute's layout alone),
gather_grouped_linear (permute + grouped_linear) and grouped_linear_combine (grouped_linear + unpermute);
and swiglu, the gated SiLU between the two linears.

The ops are listed once, in ``ops.OPS``: importing this package imports each module it names, and
``FORWARD_OPS`` (the ops export leaves to PyTorch) is that table. To add an op ``name``:

  1. write ``ops/name.py`` registering ``moefx::name`` (schema, fake, autograd, default
     implementation; a backward op, if any, as ``moefx::name_backward``);
  2. add ``"name"`` to ``OPS`` in ``ops/__init__.py``;
  3. add its slow, obviously-right version ``name`` to ``reference.py``;
  4. add tests in tests/kernels/ comparing the op (outputs and gradients) with the reference.
"""

if __name__ != "moefx.kernels":  # imported as a bare `kernels` from the repository root: not ours (see that file)
    import runpy as _runpy
    from pathlib import Path as _Path

    _runpy.run_path(str(_Path(__file__).parents[1] / "moefx" / "toplevel_names.py"))["give_way"](__name__)
else:
    import importlib as _importlib

    import torch as _torch

    from moefx.kernels.ops import OPS

    for _name in OPS:  # importing an op's module registers it
        _importlib.import_module(f"moefx.kernels.ops.{_name}")
        if not hasattr(_torch.ops.moefx, _name):
            raise ImportError(f"moefx.kernels.ops.{_name} does not register torch.ops.moefx.{_name} (see ops.OPS)")
    del _name

    from moefx.kernels.cuda import registration as cuda_kernels

    # The ops a forward can contain, as ``torch.ops.moefx`` names (backward ops are not listed).
    FORWARD_OPS = tuple(OPS)

    cuda_kernels.register()
