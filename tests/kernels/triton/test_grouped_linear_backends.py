"""The grouped linear's CUDA backends: torch._grouped_mm (its CPU implementation runs here) against
the reference, and the per-shape choice between it and the Triton kernels."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'moefx[triton]')")
if not hasattr(torch, "_grouped_mm"):
    pytest.skip("this torch has no torch._grouped_mm", allow_module_level=True)

from moefx.kernels import reference
from moefx.kernels.cuda import backends as grouped_linear_backends
from moefx.kernels.cuda import grouped_mm as grouped_mm_linear
from moefx.kernels.cuda.tuning import ConfigCache

# Rows per expert, then dropped rows at the end.
SEGMENTS = {"uneven": ([5, 1, 9], 0), "zero-row-experts": ([0, 6, 0, 3], 0), "dropped-tail": ([4, 0, 5], 6),
            "all-dropped": ([0, 0], 5)}
I, O = 8, 12  # multiples of 4 floats: 16-byte strides, as torch._grouped_mm requires


def _case(name):
    sizes, dropped = SEGMENTS[name]
    g = torch.Generator().manual_seed(0)
    S, E = sum(sizes) + dropped, len(sizes)
    x = torch.randn(S, I, generator=g, dtype=torch.float64)
    w = torch.randn(E, O, I, generator=g, dtype=torch.float64)
    dy = torch.randn(S, O, generator=g, dtype=torch.float64)
    return x, w, dy, torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])


def _reference(x, w, dy, offsets):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = reference.grouped_linear(xr, wr, None, offsets.tolist())
    (y * dy).sum().add(0 * (xr.sum() + wr.sum())).backward()  # zero gradients where nothing flows
    return y.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("name", SEGMENTS)
def test_grouped_mm_backend_matches_the_reference(name):
    x, w, dy, offsets = _case(name)
    want_y, want_dx, want_dw = _reference(x, w, dy, offsets)
    f = lambda t: t.float()
    torch.testing.assert_close(grouped_mm_linear.forward(f(x), f(w), offsets).double(), want_y, rtol=1e-5, atol=1e-5)
    dx, dw, db = grouped_mm_linear.backward(f(dy), f(x), f(w), offsets, True, True)
    torch.testing.assert_close(dx.double(), want_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-4)
    assert db.numel() == 0


def test_grouped_mm_backend_is_offered_only_where_it_applies():
    x, w = torch.randn(6, 8), torch.randn(3, 12, 8)
    assert grouped_mm_linear.usable(x, w, has_bias=False)
    assert not grouped_mm_linear.usable(x, w, has_bias=True), "no per-expert bias in torch._grouped_mm"
    assert not grouped_mm_linear.usable(torch.randn(6, 5), torch.randn(3, 12, 5), has_bias=False), "20-byte rows"
    assert not grouped_mm_linear.usable(x.double(), w, has_bias=False)


@pytest.mark.parametrize("faster", ["triton", "grouped_mm"])
def test_the_faster_backend_is_chosen_per_shape_and_both_give_the_same_result(faster, monkeypatch):
    timings = {"triton": 2.0, "grouped_mm": 3.0} if faster == "triton" else {"triton": 3.0, "grouped_mm": 1.0}
    ran = []

    def run_backend(backend):  # what the fake clock sees: the backend the launch ran
        ran.append(backend)
        return backend

    def measure(launch):
        launch()
        return timings[ran[-1]]

    cache = ConfigCache(measure=measure)
    monkeypatch.setattr(grouped_linear_backends, "BACKENDS", cache)
    monkeypatch.setattr(grouped_linear_backends, "can_time", lambda device: True)
    real_mm, real_triton = grouped_mm_linear.forward, grouped_linear_backends.triton_grouped_linear.grouped_linear_forward
    monkeypatch.setattr(grouped_mm_linear, "forward", lambda *a: (run_backend("grouped_mm"), real_mm(*a))[1])
    monkeypatch.setattr(grouped_linear_backends.triton_grouped_linear, "grouped_linear_forward",
                        lambda *a: (run_backend("triton"), real_triton(*a))[1])

    x, w, dy, offsets = _case("dropped-tail")
    want_y, _, _ = _reference(x, w, dy, offsets)
    got = grouped_linear_backends.forward(x.float(), w.float(), None, offsets)
    torch.testing.assert_close(got.double(), want_y, rtol=1e-5, atol=1e-5)
    assert list(cache.chosen.values()) == [faster]
    ran.clear()
    grouped_linear_backends.forward(x.float(), w.float(), None, offsets)
    assert ran == [faster], "a known shape runs its choice once, untimed"


def test_a_call_with_a_bias_does_not_reuse_a_bias_free_grouped_mm_choice(monkeypatch):
    cache = ConfigCache(measure=lambda launch: 1.0 if launch() == "grouped_mm" else 2.0)  # grouped_mm always wins
    monkeypatch.setattr(grouped_linear_backends, "BACKENDS", cache)
    monkeypatch.setattr(grouped_linear_backends, "can_time", lambda device: True)
    real_mm = grouped_mm_linear.forward
    monkeypatch.setattr(grouped_mm_linear, "forward", lambda *a: (real_mm(*a), "grouped_mm")[1])
    x, w, _, offsets = _case("uneven")
    assert grouped_linear_backends.forward(x.float(), w.float(), None, offsets) == "grouped_mm"
    bias = torch.randn(w.shape[0], O, dtype=torch.float64)
    got = grouped_linear_backends.forward(x.float(), w.float(), bias.float(), offsets)  # only Triton takes a bias
    want = reference.grouped_linear(x, w, bias, offsets.tolist())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
