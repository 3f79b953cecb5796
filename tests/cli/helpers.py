"""Running the real ``moefx`` command in a subprocess, and small model files to feed it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def moefx(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> Result:
    environment = {**os.environ, "NO_COLOR": "", **(env or {})}
    environment.pop("FORCE_COLOR", None) if "FORCE_COLOR" not in (env or {}) else None
    done = subprocess.run(
        [sys.executable, "-m", "moefx", *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True,
        timeout=timeout,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def write_model_file(directory: Path, body: str, name: str = "model.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


MLP_MODEL = """
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))

def example_inputs():
    return (torch.randn(3, 8),)
"""
