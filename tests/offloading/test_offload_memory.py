"""moefx.offload bounds resident memory: a model whose expert weights are 8x the budget runs, in a
fresh process, with its resident set rising by no more than the non-expert weights + the budget
+ a fixed allowance for activations and the loader (measured rise: see benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moefx
from moefx.offloading.store import stacked_expert_tensors
from tests.offloading import offload_memory_worker as worker

ALLOWANCE = 40 << 20  # bytes: activations of the small batches, the loader thread, allocator slack
EXPERTS = 16
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_offloaded_resident_memory_is_bounded_by_the_budget(tmp_path):
    torch.manual_seed(0)
    model = worker.build_model()
    moefx.moefy(model, num_experts=EXPERTS, top_k=2, init="random", example_inputs=(torch.randn(2, 8, worker.D),))
    expert_ids = {id(t) for _, layer in moefx.moe_layers(model) for t in stacked_expert_tensors(layer.experts).values()}
    expert_bytes = sum(t.numel() * t.element_size() for t in model.parameters() if id(t) in expert_ids)
    other_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in expert_ids)
    moefx.save(model, tmp_path / "out")
    del model
    budget = expert_bytes // 8
    assert expert_bytes > other_bytes + budget + ALLOWANCE  # loading every expert would break the bound
    done = subprocess.run(
        [sys.executable, "-m", "tests.offloading.offload_memory_worker", str(tmp_path / "out"), str(budget)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    slots = EXPERTS * worker.LAYERS // 8
    assert result["stats"]["loads"] > slots  # experts really streamed through the slots
    assert result["rise"] <= other_bytes + budget + ALLOWANCE, (result["rise"] >> 20, other_bytes >> 20, budget >> 20)
