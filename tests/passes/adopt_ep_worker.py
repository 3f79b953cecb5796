"""An adopted Mixtral-like model, expert-parallel over 2 ranks (gloo, CPU, float64), against the
single-process model: outputs and the experts' gradients. Run by test_adopt_modes.py:

    torchrun --standalone --nproc_per_node 2 tests/passes/adopt_ep_worker.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import moefx
from tests.passes.adopt_models import hf_model


def main() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = hf_model("mixtral").double()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(10 + rank))
    moefx.moefy(model, example_inputs=(ids,))
    single = copy.deepcopy(model)
    moefx.parallelize(model, moefx.expert_parallel_mesh(ep_size=world), data_parallel=False)
    got, want = model(ids).logits, single(ids).logits
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 1e-10, f"rank {rank}: EP output differs by {err:.3g}"
    got.square().mean().backward()
    want.square().mean().backward()
    for (name, layer), (_, ref) in zip(moefx.moe_layers(model), moefx.moe_layers(single)):
        # every rank's tokens reach a rank's experts; parallelize averages expert grads over the ranks
        want = ref.experts.in_proj.grad.clone()
        dist.all_reduce(want)
        local = layer.experts.in_proj.shape[0]
        want = want[rank * local:(rank + 1) * local] / world
        err = float((layer.experts.in_proj.grad - want).abs().max() / want.abs().max())
        assert err <= 1e-10, f"rank {rank}: {name} expert gradients differ by {err:.3g}"
    print(f"rank {rank}: adopted ep ok", flush=True)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        main()
    finally:
        dist.destroy_process_group()
