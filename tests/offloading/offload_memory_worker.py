"""Run in a fresh process by test_offload_memory.py: offload a saved model from disk and print,
as JSON, how far the resident set rose above what the process held before the offload."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from torch import nn

import moefx

D, H, LAYERS = 256, 1024, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.ffn = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))

    def forward(self, x):
        return x + self.ffn(self.norm(x))


def build_model() -> nn.Module:
    return nn.Sequential(*(Block() for _ in range(LAYERS)))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(out_dir: str, budget_bytes: int) -> None:
    with torch.device("meta"):
        dense = build_model()
    model = moefx.load(out_dir, dense, weights=False)
    gc.collect()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set starts again from here
    moefx.offload(model, device="cpu", budget_bytes=budget_bytes, storage="disk", path=out_dir)
    with torch.no_grad():
        for seed in range(3):
            model(torch.randn(4, 32, D, generator=torch.Generator().manual_seed(seed)))
    print(json.dumps({"rise": _status("VmHWM") - baseline, "stats": moefx.offload_stats(model).as_dict()}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
