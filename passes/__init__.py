"""FX passes, one per file: capture, canonicalize, find_ffn, plan, rewrite (see DESIGN.md).

Installed as ``moefx.passes``. The passes arrive with the compiler-passes issue; the runtime they
target (``moefx.MoE``, ``moefx.FFNTemplate``) is in ``moefx/``.
"""

if __name__ != "moefx.passes":  # imported as a bare `passes` from the repository root: not ours (see that file)
    import runpy as _runpy
    from pathlib import Path as _Path

    _runpy.run_path(str(_Path(__file__).parents[1] / "moefx" / "toplevel_names.py"))["give_way"](__name__)
