"""The ``moefx`` command (convert, inspect, export, bench) and its rich views, installed as ``moefx.cli``."""

if __name__ != "moefx.cli":  # imported as a bare `cli` from the repository root: not ours (see that file)
    import runpy as _runpy
    from pathlib import Path as _Path

    _runpy.run_path(str(_Path(__file__).parents[1] / "moefx" / "toplevel_names.py"))["give_way"](__name__)
