"""Compiles the Triton kernels for an H100 (sm_90) without a GPU, in a process of its own: run
with TRITON_INTERPRET unset (under the interpreter the kernels are not compiled). Prints, as
JSON, each variant's shared memory, whether its products use Hopper's wgmma and its loop is
pipelined, its registers and spill stack, or its error.

    python -m tests.kernels.triton.hopper_compile
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

from moefx.kernels.cuda.tuning import TileConfig, matmul_candidates, outer_candidates
from moefx.kernels.triton.grouped_linear import GROUP_M, _segment_matmul_kernel, _segment_outer_kernel
from moefx.kernels.triton.route import _route_kernel

HOPPER = GPUTarget("cuda", 90, 32)
SIZES = ("S", "N", "O", "I")  # the kernels' row and feature counts: multiples of 16 at the big shape
BIG = (32768, 28672, 4096)  # the Mixtral-like shape's first linear (rows, out, in): a big shape's candidates


def _matmul(dtype: str, config: TileConfig, K: int = 4096, experts: int = 8, **flags):
    flags = dict(HAS_BIAS=False, GATHER_A=False, SCATTER_OUT=False, SCALE=False, ROW_DOTS=False,
                 IEEE=dtype == "fp32") | flags
    pointers = {name: f"*{dtype}" for name in ("a_ptr", "b_ptr", "bias_ptr", "out_ptr", "dot_with_ptr")}
    pointers |= {name: "*i64" for name in ("offsets_ptr", "a_rows_ptr", "out_rows_ptr")}
    pointers |= {name: "*fp32" for name in ("scale_ptr", "dots_ptr")}
    constants = dict(flags, K=K, BM=config.BM, BN=config.BN, BK=config.BK, BE=triton.next_power_of_2(experts),
                     GROUP_M=GROUP_M, stride_ak=1, stride_on=1, stride_dn=1)
    return _segment_matmul_kernel, pointers, constants, config


def _outer(dtype: str, config: TileConfig, **flags):
    flags = dict(HAS_BIAS=False, GATHER_DY=False, GATHER_X=False, SCALE=False, IEEE=dtype == "fp32") | flags
    pointers = {name: f"*{dtype}" for name in ("dy_ptr", "x_ptr", "dw_ptr", "db_ptr")}
    pointers |= {name: "*i64" for name in ("offsets_ptr", "dy_rows_ptr", "x_rows_ptr")} | {"scale_ptr": "*fp32"}
    constants = dict(flags, BM=config.BM, BN=config.BN, BK=config.BK, stride_dyo=1, stride_xi=1, stride_dwi=1)
    return _segment_outer_kernel, pointers, constants, config


def _route(experts: int, top_k: int):
    BE = triton.next_power_of_2(experts)
    constants = dict(K=top_k, KP=triton.next_power_of_2(top_k), RENORMALIZE=True, SOFTMAX_FIRST=True,
                     BT=max(1, min(64, 4096 // BE)), BE=BE, stride_e=1)
    pointers = {"logits_ptr": "*bf16", "weights_ptr": "*fp32", "experts_ptr": "*i64"}
    return _route_kernel, pointers, constants, TileConfig(16, 16, 16, 4, 3)


def variants() -> dict[str, tuple]:
    """name -> (kernel, pointer types, constants, config, whether its products must use wgmma)."""
    found = {}
    for c in matmul_candidates(*BIG):  # every tile, as the gather's first linear runs it
        found[f"matmul-bf16-gather-{c}"] = (*_matmul("bf16", c, GATHER_A=True), c.BM >= 64)
    for c in outer_candidates(*BIG):
        found[f"outer-bf16-gather-{c}"] = (*_outer("bf16", c, GATHER_X=True), c.BM >= 64)
    first, first_outer = matmul_candidates(*BIG)[0], outer_candidates(*BIG)[0]
    found["matmul-bf16-combine"] = (*_matmul("bf16", first, SCATTER_OUT=True, SCALE=True, HAS_BIAS=True), True)
    found["matmul-bf16-combine-backward"] = (*_matmul("bf16", first, GATHER_A=True, SCALE=True, ROW_DOTS=True), True)
    found["matmul-fp16-bias-odd-in"] = (*_matmul("fp16", first, K=40, HAS_BIAS=True), True)
    found["matmul-fp32-ieee-one-expert"] = (*_matmul("fp32", first, experts=1), False)
    found["outer-bf16-combine-backward"] = (*_outer("bf16", first_outer, GATHER_DY=True, SCALE=True, HAS_BIAS=True), True)
    found["outer-fp32-ieee"] = (*_outer("fp32", first_outer), False)
    for experts, top_k in ((6, 3), (8, 2), (64, 8)):
        found[f"route-E{experts}-k{top_k}"] = (*_route(experts, top_k), False)
    return found


def compile_for_hopper(kernel, pointers: dict[str, str], constants: dict, config: TileConfig):
    """``kernel`` compiled for sm_90: pointers typed by ``pointers``, other non-constant arguments
    i32, ``constants`` (flags, tiles, unit strides) specialized as a launch does. As a launch on
    the big shape's tensors does, pointers (torch aligns them), strides and sizes are marked
    divisible by 16 (Triton specialises every such integer): without that a mask along a row
    cannot be vectorised, the loop is not pipelined (no ``cp.async``, one stage of shared
    memory), and the report would describe a kernel no launch runs."""
    signature = {name: pointers.get(name, "i32") for name in kernel.arg_names}
    signature.update({name: "constexpr" for name in constants})
    divisible = [["tt.divisibility", 16]]
    attrs = {(i,): divisible for i, name in enumerate(kernel.arg_names)
             if name not in constants and (name in pointers or name.startswith("stride_") or name in SIZES)}
    options = make_backend(HOPPER).parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs), target=HOPPER,
                          options=options.__dict__)


def spill_free() -> set[str]:
    """The variants at the tiles tried first (and run untimed where the tuner cannot time): their
    accumulators must stay in registers, no local-memory stack."""
    first, first_outer = matmul_candidates(*BIG)[0], outer_candidates(*BIG)[0]
    return {f"matmul-bf16-gather-{first}", f"outer-bf16-gather-{first_outer}", "matmul-bf16-combine",
            "matmul-bf16-combine-backward", "outer-bf16-combine-backward"}


def registers_and_stack(cubin: bytes) -> tuple[int, int]:
    """Registers per thread and local-memory stack bytes (spills), read by the cuobjdump that
    Triton's CUDA backend bundles."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no REG/STACK in cuobjdump's output: {usage[-500:]}")
    return int(found[1]), int(found[2])


def main() -> None:
    report = {}
    for name, (kernel, pointers, constants, config, _) in variants().items():
        try:
            compiled = compile_for_hopper(kernel, pointers, constants, config)
            ptx = compiled.asm["ptx"]
            registers, stack = registers_and_stack(compiled.asm["cubin"])
            report[name] = {"shared": compiled.metadata.shared, "wgmma": "wgmma" in ptx, "pipelined": "cp.async" in ptx,
                            "registers": registers, "stack": stack}
        except Exception as e:
            report[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
