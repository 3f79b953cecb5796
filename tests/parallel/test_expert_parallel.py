"""Expert parallelism on CPU with gloo, 2 and 4 processes launched by torchrun. Every launch has
a timeout, so a hang fails the test instead of blocking CI."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENCE = [f"equivalence:{routing}:{capacity}"
               for routing in ("random", "rank1_idle", "all_to_rank0") for capacity in ("none", "capacity")]


# A rank killed by the C++ runtime (std::terminate in a thread: SIGABRT, no Python error) was seen
# about once in three full CPU runs with gloo, in training and at exit, with every printed result
# right. Its cause is not found (see the closing note of session 12): such a launch is tried once
# more, with a warning; any other failure, and a second abort, fail the test.
_RUNTIME_ABORT = "terminate called without an active exception"


def torchrun(nproc: int, script: Path, *args: str, timeout: int = 240) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 and _RUNTIME_ABORT in done.stderr:
        warnings.warn(f"torchrun {script.name} {' '.join(args)}: a rank aborted in the C++ runtime; trying once more", stacklevel=2)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


@pytest.mark.parametrize("nproc", [2, 4])
def test_ep_layer_equals_the_single_process_layer(nproc):
    """Uneven routing, a rank whose experts get no token, every token to one rank, dropless and
    capacity mode: outputs, input/router/expert gradients and dropped counts match."""
    out = torchrun(nproc, ROOT / "tests" / "parallel" / "worker.py", *EQUIVALENCE, "export")
    for spec in [*EQUIVALENCE, "export"]:
        assert out.count(f": {spec} ok") == nproc, out


def test_routing_bias_updates_from_the_load_of_every_rank():
    out = torchrun(2, ROOT / "tests" / "parallel" / "worker.py", "routing_bias")
    assert out.count(": routing_bias ok") == 2, out


def test_bad_setups_raise_on_every_rank():
    out = torchrun(2, ROOT / "tests" / "parallel" / "worker.py", "errors")
    assert out.count(": errors ok") == 2


def _losses(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", out)]


@pytest.mark.parametrize("nproc,steps", [(2, 5), (4, 3)])  # EP only; EP x DP (ep 2, dp 2 against dp 4)
def test_training_steps_with_ep2_match_ep1(nproc, steps):
    """Same seed and data per rank: splitting the experts over 2 ranks changes no loss. Plain SGD,
    so a wrong expert-gradient scale or a missing dp all-reduce would show (Adam hides scale)."""
    example = ROOT / "examples" / "train_ep.py"
    ep2 = _losses(torchrun(nproc, example, "--ep-size", "2", "--steps", str(steps)))
    ep1 = _losses(torchrun(nproc, example, "--ep-size", "1", "--steps", str(steps)))
    assert len(ep2) == len(ep1) == steps
    assert ep2 == pytest.approx(ep1, rel=1e-6)
    assert len(set(ep2)) > 1, "the loss should change as the model trains"


@pytest.mark.parametrize("nproc", [2, 4])  # EP 2 alone; EP 2 x DP 2, where the experts' dp hook runs too
def test_fsdp2_for_the_rest_of_the_model_trains_like_ddp(nproc):
    """``parallelize(data_parallel=False)`` then FSDP2 over every rank, the expert weights ignored
    (``moefx.parallel.parallelize.expert_parameters``): the losses of DDP, step for step."""
    example = ROOT / "examples" / "train_ep.py"
    fsdp = _losses(torchrun(nproc, example, "--ep-size", "2", "--steps", "3", "--fsdp"))
    ddp = _losses(torchrun(nproc, example, "--ep-size", "2", "--steps", "3"))
    assert len(fsdp) == len(ddp) == 3
    assert fsdp == pytest.approx(ddp, rel=1e-6)
    assert len(set(fsdp)) > 1, "the loss should change as the model trains"


def test_checkpoint_saved_at_4_ranks_loads_at_2_and_at_1(tmp_path):
    worker = ROOT / "tests" / "parallel" / "worker.py"
    out = torchrun(4, worker, f"checkpoint_save:{tmp_path}")
    assert out.count(f"checkpoint_save:{tmp_path} ok") == 4
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert "moefx.json" in files and all(f.endswith((".safetensors", ".json")) for f in files), files
    import torch

    import moefx
    from tests.parallel.worker import FIXED_X, _dense_model, converted_model

    single_process = converted_model(seed=5, ep_size=1)  # it has an integer buffer, as the others
    moefx.save(single_process, tmp_path / "single")
    with torch.no_grad():
        torch.save(single_process(FIXED_X), tmp_path / "single_reference.pt")
    specs = [f"checkpoint_load:{tmp_path}", f"checkpoint_load_single:{tmp_path}", f"checkpoint_dies:{tmp_path}",
             f"checkpoint_write_fails:{tmp_path}"]
    out = torchrun(2, worker, *specs, timeout=180)
    for spec in specs:
        assert out.count(f"{spec} ok") == 2, out

    single = moefx.moefy(_dense_model(seed=0), num_experts=4, top_k=2, example_inputs=(FIXED_X,))
    loaded = moefx.load(tmp_path / "checkpoint", _dense_model(seed=3))  # re-converted, then filled in
    reference = torch.load(tmp_path / "reference.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(FIXED_X), reference, rtol=1e-6, atol=1e-6)
    manifest = moefx.artifact.format.read_manifest(tmp_path / "checkpoint")
    counts = moefx.model.parameter_counts(single)
    assert manifest["parameters"] == {"total": counts.total, "active_per_token": counts.active_per_token,
                                      "per_expert": counts.expert}
