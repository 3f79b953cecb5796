"""The wheel installs passes/, kernels/ and cli/ under moefx, and nothing else at the top."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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
    assert "moefx/kernels/grouped_linear.py" in names
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "moefx = moefx.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
