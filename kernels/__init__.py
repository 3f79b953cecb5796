"""moefx's custom ops (``torch.ops.moefx.*``), registered with ``torch.library`` on import.

Each op module holds one op: its schema, fake (meta) implementation, autograd formula and the
default (CPU) implementation; ``reference.py`` holds slow, obviously-right versions for tests.
Device kernels (Triton on CUDA) register for their dispatch key beside the default. Call the ops
through ``torch.ops.moefx``: route, permute, grouped_linear, unpermute, all_to_all (expert parallelism),
and the fused forms a local layer runs: plan_dispatch (permute's layout alone),
gather_grouped_linear (permute + grouped_linear) and grouped_linear_combine (grouped_linear + unpermute);
and swiglu, the gated SiLU between the two linears.
"""

if __name__ != "moefx.kernels":  # imported as a bare `kernels` from the repository root: not ours (see that file)
    import runpy as _runpy
    from pathlib import Path as _Path

    _runpy.run_path(str(_Path(__file__).parents[1] / "moefx" / "toplevel_names.py"))["give_way"](__name__)
else:
    from moefx.kernels.ops import (  # noqa: F401  (registers the ops)
        all_to_all,
        gather_grouped_linear,
        grouped_linear,
        grouped_linear_combine,
        permute,
        plan_dispatch,
        route,
        swiglu,
        unpermute,
    )
    from moefx.kernels.cuda import registration as cuda_kernels

    # The ops a forward can contain, as ``torch.ops.moefx`` names (backward ops are not listed).
    FORWARD_OPS = (
        "route", "permute", "plan_dispatch", "grouped_linear", "gather_grouped_linear", "grouped_linear_combine",
        "unpermute", "all_to_all", "swiglu",
    )

    cuda_kernels.register()
