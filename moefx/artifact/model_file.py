"""A model file: a Python file that defines how to build a model and, optionally, its example inputs.

    # model.py
    def build_model() -> nn.Module: ...      # or a module-level `model = ...`; another name via entry=
    def example_inputs():                    # optional: the forward's positional arguments as a
        return (tokens,)                     # tuple, or (args, kwargs)

Loading one runs its code (like ``python model.py`` would, without ``__main__``). Every failure
is a ``ModelFileError`` whose message names the file, the line and what to change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from torch import nn

DEFAULT_ENTRIES = ("build_model", "model")
# What moefx converts from, for the messages that refuse anything else (one place to extend).
MODEL_FILE_SOURCE = "a Python model file (.py) defining build_model() and example_inputs()"
ACCEPTED_SOURCES = (f"{MODEL_FILE_SOURCE}, a transformers checkpoint directory (config.json + safetensors), or the hub "
                    "id of a model in the local Hugging Face cache")  # what moefx convert / moefx.convert take


class ModelFileError(RuntimeError):
    """The model file cannot be loaded, or builds no model."""


@dataclass(frozen=True)
class ModelFile:
    path: Path
    entry: str  # the builder's name in the file
    model: nn.Module
    example_args: tuple | None  # None: the file defines no example_inputs()
    example_kwargs: dict | None


def load_model_file(path: str | Path, entry: str | None = None) -> ModelFile:
    """Run the file, build its model and its example inputs."""
    problem = source_problem(path)
    if problem is not None:
        raise ModelFileError(problem)
    path = Path(path).resolve()
    sys.path.insert(0, str(path.parent))  # the file, and its builders when they run, may import its neighbours
    try:
        module = _import(path)
        entry, builder = _builder(module, path, entry)
        model = _call(builder, path, entry) if callable(builder) and not isinstance(builder, nn.Module) else builder
        if not isinstance(model, nn.Module):
            raise ModelFileError(f"{path.name}: {entry} gave a {type(model).__name__}, not a torch.nn.Module")
        args, kwargs = None, None
        if hasattr(module, "example_inputs"):
            args, kwargs = _split_inputs(_call(module.example_inputs, path, "example_inputs"), path)
    finally:
        sys.path.remove(str(path.parent))
    return ModelFile(path, entry, model, args, kwargs)


def source_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a source moefx can convert (a message naming the fix), or None."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory, not a model file: pass {MODEL_FILE_SOURCE}"
    if not path.exists():
        return f"model file {path} not found: pass the path of {ACCEPTED_SOURCES}"
    if not path.is_file() or path.suffix != ".py":
        return f"{path} is not a Python file: pass {ACCEPTED_SOURCES}"
    return None


def _import(path: Path) -> ModuleType:
    name = f"_moefx_model_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        del sys.modules[name]
        raise ModelFileError(f"{err.filename}:{err.lineno}: syntax error: {err.msg}; fix the model file") from err
    except (Exception, SystemExit) as err:  # SystemExit: e.g. argparse at module level reading our argv
        del sys.modules[name]
        raise ModelFileError(f"{path.name}: running the file failed at {_where(err, path)}: {_what(err)}") from err
    return module


def _builder(module: ModuleType, path: Path, entry: str | None):
    if entry is not None:
        if not hasattr(module, entry):
            choices = sorted(
                n for n, v in vars(module).items()
                if not n.startswith("_")
                and (isinstance(v, nn.Module) or (callable(v) and getattr(v, "__module__", None) == module.__name__))
            )
            raise ModelFileError(f"{path.name} defines no {entry!r}; it defines {choices or 'no builder'}: pick one with --entry")
        return entry, getattr(module, entry)
    for name in DEFAULT_ENTRIES:
        if hasattr(module, name):
            return name, getattr(module, name)
    raise ModelFileError(
        f"{path.name} defines neither build_model() nor a `model` object: define one, or name the function that "
        "builds the model with --entry NAME (entry= in Python)"
    )


def _call(function, path: Path, name: str):
    try:
        return function()
    except (Exception, SystemExit) as err:
        raise ModelFileError(f"{path.name}: {name}() failed at {_where(err, path)}: {_what(err)}") from err


def _split_inputs(value, path: Path) -> tuple[tuple, dict]:
    """``(args...)``, ``(args, kwargs)`` or one tensor → ``(args, kwargs)``."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list)) and isinstance(value[1], dict):
        return tuple(value[0]), dict(value[1])
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple):
        value = (value,)
    if any(isinstance(v, dict) for v in value):
        raise ModelFileError(
            f"{path.name}: example_inputs() returned a dict among the positional arguments; return (args, kwargs) to "
            "pass keyword arguments"
        )
    return value, {}


def _where(err: Exception, path: Path) -> str:
    """The innermost frame in the model file, else the innermost frame."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if Path(f.filename) == path] or frames
    f = ours[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({(f.line or '').strip()})"


def _what(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
