"""FX passes, one per file: capture, canonicalize, find_ffn, plan, rewrite (see DESIGN.md).

Installed as ``moefx.passes``. The passes arrive with the compiler-passes issue; the runtime they
target (``moefx.MoE``, ``moefx.FFNTemplate``) is in ``moefx/``.
"""
