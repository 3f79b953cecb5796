"""The op → Triton kernel table (``moefx.kernels.cuda.registration``) wired end to end: a child
process registers the Triton kernels for CPU tensors (the interpreter runs them) and trains a
layer step through every op, fused and permuted, against the ops' default implementations; fp64
goes to the default implementations."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import moefx

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'moefx[triton]')")

SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, moefx
    from moefx.kernels.cuda import registration as cuda_kernels

    assert cuda_kernels.register("cpu")

    def step(layer, x, fused):
        layer.zero_grad()
        x = x.detach().clone().requires_grad_()
        layer.fused_experts = fused
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out, x.grad, *(p.grad for p in layer.parameters())]

    torch.manual_seed(0)
    layer = moefx.MoE(d_model=16, d_hidden=24, num_experts=4, top_k=2, bias=True, capacity_factor=1.0)
    x = torch.randn(30, 16)
    for fused in (True, False):
        got = step(layer, x, fused)
        with cuda_kernels.default_kernels("cpu"):
            want = step(layer, x, fused)
        assert int(layer.stats().dropped) > 0  # capacity drops some choices
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

    # fp64 runs the default implementations (the kernels compute in fp32): the very same numbers
    layer64 = moefx.MoE(d_model=16, d_hidden=24, num_experts=4, top_k=2, bias=True, dtype=torch.float64)
    x64 = torch.randn(30, 16, dtype=torch.float64)
    for fused in (True, False):
        got = step(layer64, x64, fused)
        with cuda_kernels.default_kernels("cpu"):
            want = step(layer64, x64, fused)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    print("ok")
""")


def test_registered_triton_kernels_train_the_layer_like_the_default_ops():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is the test above)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_cuda_kernels_train_the_layer_like_the_default_ops(dtype, capacity_factor):
    from moefx.kernels.cuda import registration as cuda_kernels

    def step(layer, x, fused):
        layer.zero_grad()
        x = x.detach().clone().requires_grad_()
        layer.fused_experts = fused
        out = layer(x)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        return [out, x.grad, *(p.grad for p in layer.parameters())]

    torch.manual_seed(0)
    # odd sizes: tiles straddle experts and the last tile of each dimension is partial
    layer = moefx.MoE(d_model=200, d_hidden=328, num_experts=8, top_k=2, bias=True, capacity_factor=capacity_factor,
                      device="cuda", dtype=dtype)
    x = torch.randn(1000, 200, device="cuda", dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for fused in (True, False):
        got = step(layer, x, fused)
        with cuda_kernels.default_kernels("cuda"):
            want = step(layer, x, fused)
        for g, w in zip(got, want, strict=True):
            g, w = g.double(), w.double()
            assert torch.isfinite(g).all()
            assert ((g - w).norm() / w.norm()).item() <= tolerance
