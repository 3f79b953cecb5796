"""The Triton kernels compile for an H100 (sm_90) here, without a GPU. The interpreter that runs
them in the other tests does not check what only the GPU compiler does: tl.dot's operand types
and tile sizes, loop-carried types, the shared memory each tile candidate needs, and whether the
products map to Hopper's tensor-core instructions (wgmma), and whether the loop is pipelined
(``cp.async``: global loads overlapping the products). ``hopper_compile`` compiles every
variant in a child process, since this folder's tests run the kernels under the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'moefx[triton]')")

from tests.kernels.triton.hopper_compile import spill_free, variants

ROOT = Path(__file__).resolve().parents[3]
MAX_SHARED_BYTES = 232448  # an H100's shared memory per block (227 KiB)
VARIANTS = variants()
SPILL_FREE = spill_free()


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.kernels.triton.hopper_compile"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", VARIANTS)
def test_kernel_compiles_for_hopper(report, name):
    result = report[name]
    assert "error" not in result, result.get("error")
    assert result["shared"] <= MAX_SHARED_BYTES, f"needs {result['shared']} bytes of shared memory"
    if VARIANTS[name][-1]:
        assert result["wgmma"], "its products do not use Hopper's wgmma"
    if "-bf16-" in name:  # the big shape's GEMMs: global loads overlap the products
        assert result["pipelined"], "its loop is not pipelined (no cp.async)"
    if name in SPILL_FREE:
        assert result["stack"] == 0, f"spills: {result['registers']} registers and {result['stack']} bytes of stack"
