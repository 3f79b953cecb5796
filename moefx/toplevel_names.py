"""Gives the top-level names ``kernels``, ``passes`` and ``cli`` back to their owners.

The repository keeps ``kernels/``, ``passes/`` and ``cli/`` at its top and installs them as
``moefx.kernels``, ``moefx.passes`` and ``moefx.cli``. Whenever the repository root is on
``sys.path`` (``python -m moefx``, ``python -m pytest``, a script run from the root), a plain
``import kernels`` would find the folder first and shadow another distribution's module:
Hugging Face's ``kernels`` (which transformers imports since 5.25) is the case that bit.

Each folder's ``__init__.py`` runs :func:`give_way` when it is imported under its bare name: the
name is then loaded from wherever it would be found without the repository root, or is an empty
namespace package, as a folder without ``__init__.py`` would be. This file imports nothing of moefx (it runs before moefx exists).
"""

import importlib.machinery
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_root(entry: str) -> bool:
    try:
        return os.path.samefile(entry or os.curdir, _ROOT)
    except OSError:
        return False


def _find_elsewhere(name: str):
    """The spec ``import name`` would get if the repository root were not on ``sys.path``."""
    own_folder = os.path.join(_ROOT, name)
    path = [entry for entry in sys.path if not _is_root(entry)]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, path)
        elif hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, None)
        else:
            continue
        if spec is not None and not (spec.origin or "").startswith(own_folder + os.sep):
            return spec
    return None


def give_way(name: str) -> None:
    """Replace ``sys.modules[name]`` (this repository's folder) by the module another distribution owns.

    With no owner, the name becomes what a folder without ``__init__.py`` would give: an empty
    namespace package (no ``__file__``, no version, no submodules). Raising instead would break a
    library that probes for the name with ``find_spec`` and then imports it to read its version
    (transformers 5.17 does so for ``kernels``, and treats an empty namespace package as absent).
    """
    spec = _find_elsewhere(name)
    if spec is None:
        placeholder = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
        placeholder.__path__ = []  # nothing below it: `import name.x` fails as for a missing module
        placeholder.__doc__ = f"Nothing: this repository's {name}/ folder is the package moefx.{name}."
        sys.modules[name] = placeholder
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds once we finish
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
