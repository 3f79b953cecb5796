"""The weight files of a moefx output directory: one safetensors file, or shards with an index."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # weights in several files (a distributed save)


def weight_files(out_dir: Path) -> list[Path]:
    if (out_dir / WEIGHTS).is_file():
        return [out_dir / WEIGHTS]
    return [out_dir / name for name in sorted(set(_weight_map(out_dir).values()))]


def tensor_files(out_dir: Path) -> dict[str, Path]:
    """Each saved tensor's file, by name, for either layout (keys of the single file are read)."""
    if (out_dir / WEIGHTS).is_file():
        with safe_open(out_dir / WEIGHTS, framework="pt") as f:
            return dict.fromkeys(f.keys(), out_dir / WEIGHTS)
    return {name: out_dir / file for name, file in _weight_map(out_dir).items()}


def _weight_map(out_dir: Path) -> dict[str, str]:
    return json.loads((out_dir / INDEX).read_text())["weight_map"]
