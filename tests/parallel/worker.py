"""Expert-parallel scenarios, run by ``torchrun`` from test_expert_parallel.py (gloo, CPU).

    torchrun --standalone --nproc_per_node 2 tests/parallel/worker.py equivalence:random:none errors

Each rank checks its own results against a single-process reference computed with the same
weights and raises on a mismatch, so the launcher's exit code is the verdict.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import moefx

D, H = 16, 24


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = _rel_err(got, want)
    if not err <= 1e-5:
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs from the single-process layer, relative error {err:.3g}")


def _inputs(rank: int, tokens: int, positive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, D, generator=g, dtype=torch.float64)
    return (x.abs() if positive else x), torch.randn(tokens, D, generator=g, dtype=torch.float64)


def _layer(num_experts: int, capacity_factor, routing: str, ep_size: int) -> moefx.MoE:
    torch.manual_seed(0)
    layer = moefx.MoE(d_model=D, d_hidden=H, num_experts=num_experts, top_k=2, capacity_factor=capacity_factor,
                      bias=True, dtype=torch.float64)
    local = num_experts // ep_size
    with torch.no_grad():  # inputs are positive here, so the sign of a router row decides
        if routing == "rank1_idle":  # no token picks rank 1's experts
            layer.router.weight[local : 2 * local] = -1.0
        elif routing == "all_to_rank0":  # every token picks rank 0's experts
            layer.router.weight[:local] = layer.router.weight[:local].abs() + 1.0
            layer.router.weight[local:] = -1.0
    return layer


def equivalence(routing: str = "random", capacity: str = "none") -> None:
    """EP forward and backward equal the single-process layer: outputs, input, router and expert grads."""
    world, rank = dist.get_world_size(), dist.get_rank()
    num_experts = 2 * world
    capacity_factor = None if capacity == "none" else 1.0
    layer = _layer(num_experts, capacity_factor, routing, world)
    reference = copy.deepcopy(layer)
    mesh = moefx.expert_parallel_mesh(ep_size=world)
    moefx.parallelize(layer, mesh, data_parallel=False)
    # Dropless: every rank a different token count (uneven splits); capacity mode needs equal counts.
    tokens = [12 if capacity_factor else 5 + 7 * r for r in range(world)]
    positive = routing != "random"
    x, g = _inputs(rank, tokens[rank], positive)
    x.requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()

    mine = None
    for r in range(world):  # the reference sees every rank's tokens; expert grads sum over them
        xr, gr = _inputs(r, tokens[r], positive)
        xr.requires_grad_(True)
        yr = reference(xr)
        (yr * gr).sum().backward()
        if r == rank:
            mine = (yr.detach(), xr.grad, reference.router.weight.grad.clone(), reference.stats().dropped.clone())
        reference.router.weight.grad = None
    want_y, want_dx, want_router, want_dropped = mine
    _close("output", y, want_y)
    _close("input gradient", x.grad, want_dx)
    _close("router gradient", layer.router.weight.grad, want_router)
    if int(layer.stats().dropped) != int(want_dropped):
        raise AssertionError(f"rank {rank}: dropped {int(layer.stats().dropped)} copies, the single-process layer {int(want_dropped)}")
    local = num_experts // world
    for name in ("in_proj", "out_proj", "in_bias", "out_bias"):
        want = getattr(reference.experts, name).grad[rank * local : (rank + 1) * local] / world
        _close(f"{name} gradient", getattr(layer.experts, name).grad, want)
    if routing == "rank1_idle" and rank == 1:
        assert layer.experts.in_proj.grad.abs().sum() == 0, "rank 1's experts got tokens"


def errors() -> None:
    """Bad set-ups raise a clear error on every rank instead of hanging."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = moefx.expert_parallel_mesh(ep_size=world)
    cases = {
        "not divisible": (lambda: moefx.MoE(d_model=D, d_hidden=H, num_experts=world + 1, top_k=1),
                          f"num_experts={world + 1}, which the EP size {world} does not divide"),
        "ranks differ": (lambda: moefx.MoE(d_model=D, d_hidden=H, num_experts=2 * world if rank else world, top_k=1),
                         "ranks differ in their MoE layers"),
    }
    for name, (build, words) in cases.items():
        try:
            moefx.parallelize(build(), mesh, data_parallel=False)
        except ValueError as err:
            if words not in str(err):
                raise AssertionError(f"rank {rank}, {name}: unexpected message {err}") from err
        else:
            raise AssertionError(f"rank {rank}, {name}: no error")
    from torch.distributed.device_mesh import DeviceMesh

    part = DeviceMesh("cpu", torch.arange(world // 2), mesh_dim_names=("ep",), _init_backend=False)
    try:
        moefx.parallelize(moefx.MoE(d_model=D, d_hidden=H, num_experts=4, top_k=1), part, data_parallel=False)
    except ValueError as err:
        assert f"the mesh has {world // 2} ranks but the world has {world}" in str(err), err
    else:
        raise AssertionError("a mesh smaller than the world was accepted")
    layer = _layer(2 * world, 1.0, "random", world)
    moefx.parallelize(layer, mesh, data_parallel=False)
    try:  # capacity mode: each rank's C comes from its token count, so the counts must agree
        layer(_inputs(rank, 12 + rank, positive=False)[0])
    except ValueError as err:
        assert f"the ranks have from 12 to {12 + world - 1} (this rank {12 + rank})" in str(err), err
    else:
        raise AssertionError("capacity mode ran with a different token count on each rank")
    layer(_inputs(rank, 12, positive=False)[0])  # equal counts still run after the refusal
    try:
        moefx.expert_parallel_mesh(ep_size=world + 1)
    except ValueError as err:
        assert f"ep_size={world + 1} must divide the world size {world}" in str(err), err
    else:
        raise AssertionError("ep_size not dividing the world was accepted")
    dist.barrier()


def export_shows_the_exchange() -> None:
    """In capacity mode nothing depends on the data: the EP layer exports, all-to-alls as nodes."""
    world = dist.get_world_size()
    layer = _layer(2 * world, 1.0, "random", world)
    moefx.parallelize(layer, moefx.expert_parallel_mesh(ep_size=world), data_parallel=False)
    x, _ = _inputs(dist.get_rank(), 12, positive=False)
    program = torch.export.export(layer, (x,), strict=False)
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    exchanges = [op for op in ops if op == "moefx.all_to_all.default"]
    assert len(exchanges) == 2, f"expected the dispatch and combine all-to-alls, got {ops}"
    torch.testing.assert_close(program.module()(x), layer(x))


class _IntegerShift(torch.nn.Module):
    """Adds an integer buffer, as models hold position ids: checkpoints must carry those too."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.randint(-3, 4, (D,)))

    def forward(self, x):
        return x + self.shift


def _dense_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    ffn = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.GELU(), torch.nn.Linear(H, D))
    return torch.nn.Sequential(torch.nn.Linear(D, D), ffn, torch.nn.LayerNorm(D), _IntegerShift())


FIXED_X = torch.randn(20, D, generator=torch.Generator().manual_seed(7))


def converted_model(seed: int, ep_size: int) -> torch.nn.Module:
    """The checkpoint scenarios' model: a dense block, its FFN upcycled to 4 experts, parallelised."""
    model = moefx.moefy(_dense_model(seed), num_experts=4, top_k=2, example_inputs=(FIXED_X,))
    if ep_size > 1:
        moefx.parallelize(model, moefx.expert_parallel_mesh(ep_size=ep_size), data_parallel=False)
    return model


def checkpoint_save(directory: str) -> None:
    """Save at EP = world size; rank 0 also writes the outputs the loads must reproduce."""
    model = converted_model(seed=0, ep_size=dist.get_world_size())
    with torch.no_grad():
        reference = model(FIXED_X)
    moefx.save(model, f"{directory}/checkpoint")
    if dist.get_rank() == 0:
        torch.save(reference, f"{directory}/reference.pt")


def checkpoint_load(directory: str, saved: str = "checkpoint", reference: str = "reference.pt") -> None:
    """Load at EP = world size, into a model with other weights: the saved outputs come back."""
    model = converted_model(seed=1, ep_size=dist.get_world_size())
    moefx.load(f"{directory}/{saved}", model)
    want = torch.load(f"{directory}/{reference}", weights_only=True)
    with torch.no_grad():
        _close(f"output after loading {saved}", model(FIXED_X), want)


def checkpoint_load_single(directory: str) -> None:
    """A single-process output (one model.safetensors, no index), loaded the same way."""
    checkpoint_load(directory, "single", "single_reference.pt")


def checkpoint_dies(directory: str) -> None:
    """A save that fails after the shards are written (rank 0 cannot finish) raises on every rank
    and leaves the previous checkpoint as it was, with no temporary directory behind."""
    import moefx.parallel.checkpoint as checkpoint

    model = converted_model(seed=2, ep_size=dist.get_world_size())
    if dist.get_rank() == 0:  # the shards are written; the manifest is not
        def no_manifest(*args, **kwargs):
            raise OSError("disk full")
        checkpoint.write_manifest, real_write = no_manifest, checkpoint.write_manifest
    try:
        moefx.save(model, f"{directory}/checkpoint", force=True)
    except RuntimeError as err:  # CheckpointError
        assert "disk full" in str(err), err
    else:
        raise AssertionError("the failed save did not raise")
    finally:
        if dist.get_rank() == 0:
            checkpoint.write_manifest = real_write
    dist.barrier()
    leftovers = [p.name for p in Path(directory).iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary directories left: {leftovers}"
    checkpoint_load(directory)  # the previous checkpoint, whole


def checkpoint_write_fails(directory: str) -> None:
    """A rank whose shard write fails inside DCP: every rank raises (none hangs), the previous
    checkpoint is kept."""
    import torch.distributed.checkpoint as dcp

    model = converted_model(seed=2, ep_size=dist.get_world_size())
    real = dcp.HuggingFaceStorageWriter.write_data
    if dist.get_rank() == 1:
        def broken(self, *args, **kwargs):
            raise OSError("disk full on rank 1")
        dcp.HuggingFaceStorageWriter.write_data = broken
    from moefx.parallel.checkpoint import CheckpointError

    try:
        moefx.save(model, f"{directory}/checkpoint", force=True)
    except CheckpointError as err:
        assert "disk full on rank 1" in str(err), err
    else:
        raise AssertionError("the failed save did not raise")
    finally:
        dcp.HuggingFaceStorageWriter.write_data = real
    checkpoint_load(directory)


def routing_bias() -> None:
    """``update_routing_bias`` balances on the load of every rank: each rank routes its own tokens,
    over expert-parallel layers, and all end with the bias the summed load gives."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    layer = moefx.MoE(d_model=D, d_hidden=H, num_experts=2 * world, top_k=2, gate="sigmoid", bias_update_rate=0.1,
                      dtype=torch.float64)
    moefx.parallelize(layer, moefx.expert_parallel_mesh(ep_size=world), data_parallel=False)
    x, _ = _inputs(rank, 10 + 5 * rank, positive=False)
    layer(x)
    load = torch.bincount(layer.router(x).experts_TK.reshape(-1), minlength=2 * world).double()
    everyone = [torch.empty_like(load) for _ in range(world)]
    dist.all_gather(everyone, load)
    total = torch.stack(everyone).sum(0)
    moefx.update_routing_bias(layer)
    _close("score_bias", layer.router.score_bias, 0.1 * torch.sign(total.mean() - total))
    if torch.equal(total, load * world):
        raise AssertionError("the ranks' loads should differ, or this checks nothing")


SCENARIOS = {"equivalence": equivalence, "errors": errors, "export": export_shows_the_exchange,
             "routing_bias": routing_bias,
             "checkpoint_save": checkpoint_save, "checkpoint_load": checkpoint_load,
             "checkpoint_load_single": checkpoint_load_single,
             "checkpoint_dies": checkpoint_dies, "checkpoint_write_fails": checkpoint_write_fails}

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for spec in sys.argv[1:]:  # name[:arg[:arg]] ...
            name, *args = spec.split(":")
            SCENARIOS[name](*args)
            print(f"rank {dist.get_rank()}: {spec} ok", flush=True)
    finally:
        dist.destroy_process_group()
    # Every scenario passed (a failure raised above). Skip the interpreter's teardown: gloo's
    # worker threads can abort the process there ("terminate called without an active
    # exception", SIGABRT) after the work is done; seen once in CI on a 2-core machine.
    sys.stderr.flush()
    os._exit(0)
