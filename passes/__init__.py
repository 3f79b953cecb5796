"""FX passes, one per file: capture, canonicalize, find_ffn, plan, rewrite; ``driver`` runs them.

Installed as ``moefx.passes``. Beside the passes: ``placement`` (where an MoE goes in the module
tree), ``region`` (a candidate FFN and its checks), ``inline/`` (rewriting an FFN inside a bigger
forward), ``graph/`` (op tables, the linear normal form, dominance, the feature axis, rows, the
activation subgraph). The runtime they target (``moefx.MoE``, ``moefx.FFNTemplate``) is in
``moefx/layer`` and ``moefx/init``; activations are named by ``moefx.layer.activations``.
"""

if __name__ != "moefx.passes":  # imported as a bare `passes` from the repository root: not ours (see that file)
    import runpy as _runpy
    from pathlib import Path as _Path

    _runpy.run_path(str(_Path(__file__).parents[1] / "moefx" / "toplevel_names.py"))["give_way"](__name__)
