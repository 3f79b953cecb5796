"""The bundled examples run and say what they promise."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_example_upcycles_a_tiny_llama_exactly_and_trains():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "upcycle_llama.py"), "--steps", "2"],
        check=True, capture_output=True, text=True,
    ).stdout
    assert "converted 4 feed-forward blocks" in out
    diff = float(out.split("vs the dense model: ")[1].split()[0])
    assert diff < 1e-5
    assert "step 1: loss" in out
