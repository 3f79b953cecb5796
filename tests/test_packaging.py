"""The wheel installs passes/, kernels/ and cli/ under moefx, and nothing else at the top."""

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_top_level_folders_under_moefx(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and *.egg-info behind, and a stale
    # build/ could carry deleted modules into the wheel.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("moefx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"moefx", next(t for t in top if t.endswith(".dist-info"))}
    for package in ("passes", "kernels", "cli"):
        assert f"moefx/{package}/__init__.py" in names
    # Every source file of the four folders, at its installed place (a subpackage missing from
    # pyproject.toml's list would be left out silently).
    for folder, installed in (("moefx", "moefx"), ("passes", "moefx/passes"), ("kernels", "moefx/kernels"), ("cli", "moefx/cli")):
        for path in (ROOT / folder).rglob("*.py"):
            assert f"{installed}/{path.relative_to(ROOT / folder).as_posix()}" in names, f"{path} is not in the wheel"
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "moefx = moefx.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


# Run from the repository root, whose kernels/, passes/ and cli/ folders are on sys.path first.
_FROM_ROOT = """
import importlib.util, os, sys
root = os.getcwd()
import transformers  # since 5.25 it imports Hugging Face's `kernels` on import
import kernels
def ours(module, name):  # the repository's own folder (a .venv inside the root is not ours)
    return os.path.dirname(os.path.abspath(module.__file__)) == os.path.join(root, name)
assert not ours(kernels, "kernels"), kernels.__file__
from kernels import CUDAProperties  # the name whose absence first broke transformers
import moefx, moefx.kernels
assert moefx.kernels.__name__ == "moefx.kernels" and "FORWARD_OPS" in dir(moefx.kernels)
import importlib
for name in ("passes", "cli"):
    # No distribution owns these here: a library that probes the name (find_spec, then an import
    # for its version, as transformers 5.17 does for `kernels`) must see an empty namespace
    # package, which it treats as absent, and must not get an error or our folder.
    assert importlib.util.find_spec(name) is not None
    module = importlib.import_module(name)
    if getattr(module, "__file__", None) is not None:  # another distribution owns the name: it must be that one
        assert not ours(module, name), module.__file__
        continue
    assert list(module.__path__) == [] and getattr(module, "__version__", "N/A") == "N/A", module
    try:
        importlib.import_module(name + ".driver")
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(f"{name}.driver imported through the placeholder")
print("ok")
"""


def test_repository_folders_do_not_shadow_other_distributions_from_the_root():
    try:  # not importorskip: from the root, `import kernels` succeeds whether or not it is installed
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (transformers >= 5.25 installs it)")
    done = subprocess.run([sys.executable, "-c", _FROM_ROOT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_cli_runs_a_transformers_model_from_the_root():
    done = subprocess.run(
        [sys.executable, "-m", "moefx", "convert", "examples/tiny_llama.py", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "LlamaMLP" in done.stdout or "mlp" in done.stdout, done.stdout
