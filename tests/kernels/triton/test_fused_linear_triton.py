"""The Triton gather_grouped_linear and grouped_linear_combine (forward and every gradient)
against the slow reference loop: tiles that straddle experts, experts with no rows, dropped
rows (capacity and the nowhere expert), with and without biases."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'moefx[triton]')")

from moefx.kernels import reference  # noqa: E402
from moefx.kernels.triton.fused_linear import (  # noqa: E402
    gather_grouped_linear_backward,
    gather_grouped_linear_forward,
    grouped_linear_combine_backward,
    grouped_linear_combine_forward,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=2e-2)}


def _routing(kind: str, T: int, E: int, K: int):
    """``(experts_TK, capacity)``: tokens spread unevenly, some experts idle, some choices dropped."""
    g = torch.Generator().manual_seed(1)
    if kind == "uneven":  # skewed towards low experts; the top expert gets nothing
        scores = torch.rand(T, E, generator=g) + torch.linspace(1, 0, E)
        scores[:, E - 1] = -1
        return scores.argsort(dim=1, descending=True)[:, :K], None
    if kind == "capacity":
        return torch.rand(T, E, generator=g).argsort(dim=1)[:, :K], 9
    if kind == "nowhere":  # every third token skips its last choice
        experts = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
        experts[::3, K - 1] = E
        return experts, None
    raise ValueError(kind)


def _case(kind: str, bias: bool, T: int = 41, E: int = 5, K: int = 2, I: int = 40, O: int = 72):
    experts, capacity = _routing(kind, T, E, K)
    row_slot, slot_row, offsets = torch.ops.moefx.plan_dispatch(experts, E, capacity)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "x": torch.randn(T, I, generator=g, dtype=torch.float64),
        "w": torch.randn(E, O, I, generator=g, dtype=torch.float64) / I**0.5,
        "b": torch.randn(E, O, generator=g, dtype=torch.float64) if bias else None,
        "weights": torch.rand(T, K, generator=g, dtype=torch.float64),
        "h": torch.randn(T * K, I, generator=g, dtype=torch.float64),
    }
    return tensors, row_slot, slot_row, offsets


def _on(t, dtype):
    return None if t is None else t.to(DEVICE, dtype)


def _leaves(*tensors):
    return [None if t is None else t.clone().requires_grad_() for t in tensors]


def _check(got, want, dtype):
    scale = max(1.0, float(want.abs().max()))  # sums of up to S products: compare relative to the largest
    torch.testing.assert_close(got.double().cpu() / scale, want / scale, **TOLERANCE[dtype])


@pytest.mark.parametrize("kind", ["uneven", "capacity", "nowhere"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_grouped_linear_matches_the_reference(kind, bias, dtype):
    t, row_slot, slot_row, offsets = _case(kind, bias)
    K = row_slot.shape[0] // t["x"].shape[0]
    xr, wr, br = _leaves(t["x"], t["w"], t["b"])
    want = reference.gather_grouped_linear(xr, wr, br, offsets.tolist(), (row_slot // K).tolist())
    dy = torch.randn_like(want)
    touch = xr.sum() + wr.sum() + (br.sum() if bias else 0)  # zero gradients where nothing flows
    (want * dy).sum().add(0 * touch).backward()

    index = [i.to(DEVICE) for i in (offsets, row_slot, slot_row)]
    got = gather_grouped_linear_forward(_on(t["x"], dtype), _on(t["w"], dtype), _on(t["b"], dtype), *index)
    _check(got, want.detach(), dtype)
    dx, dw, db = gather_grouped_linear_backward(
        _on(dy, dtype), _on(t["x"], dtype), _on(t["w"], dtype), *index, True, True, bias
    )
    _check(dx, xr.grad, dtype)
    _check(dw, wr.grad, dtype)
    if bias:
        _check(db, br.grad, dtype)
    else:
        assert db.numel() == 0


@pytest.mark.parametrize("kind", ["uneven", "capacity", "nowhere"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_linear_combine_matches_the_reference(kind, bias, dtype):
    t, row_slot, _, offsets = _case(kind, bias)
    E, I = t["w"].shape[0], t["h"].shape[1]
    w_oi = torch.randn(E, 24, I, dtype=torch.float64) / I**0.5  # the second linear: I features to 24
    b = torch.randn(E, 24, dtype=torch.float64) if bias else None
    hr, wr, br, weights_r = _leaves(t["h"], w_oi, b, t["weights"])
    want = reference.grouped_linear_combine(hr, wr, br, offsets.tolist(), row_slot.tolist(), weights_r)
    dout = torch.randn_like(want)
    touch = hr.sum() + wr.sum() + weights_r.sum() + (br.sum() if bias else 0)
    (want * dout).sum().add(0 * touch).backward()

    got = grouped_linear_combine_forward(
        _on(t["h"], dtype), _on(w_oi, dtype), _on(b, dtype), offsets.to(DEVICE), row_slot.to(DEVICE),
        _on(t["weights"], torch.float32),
    )
    assert got.dtype == dtype
    _check(got, want.detach(), dtype)
    dh, dw, db, dweights = grouped_linear_combine_backward(
        _on(dout, dtype), _on(t["h"], dtype), _on(w_oi, dtype), _on(b, dtype), offsets.to(DEVICE), row_slot.to(DEVICE),
        _on(t["weights"], torch.float32), True, True, bias, True,
    )
    _check(dh, hr.grad, dtype)
    _check(dw, wr.grad, dtype)
    _check(dweights, weights_r.grad, dtype)
    if bias:
        _check(db, br.grad, dtype)
    else:
        assert db.numel() == 0


def test_unneeded_gradients_are_empty():
    t, row_slot, slot_row, offsets = _case("uneven", False)
    x, w = t["x"].float().to(DEVICE), t["w"].float().to(DEVICE)
    dx, dw, db = gather_grouped_linear_backward(
        torch.randn(row_slot.shape[0], w.shape[1], device=DEVICE), x, w, offsets.to(DEVICE), row_slot.to(DEVICE),
        slot_row.to(DEVICE), False, True, False,
    )
    assert dx.numel() == 0 and db.numel() == 0 and dw.shape == w.shape


@pytest.mark.parametrize("need_h, need_weights", [(True, False), (False, True)])
def test_combine_backward_gives_one_input_gradient_alone_as_it_does_with_all(need_h, need_weights):
    """dH alone and the routing weights' gradient alone take other kernel variants than both together."""
    t, row_slot, _, offsets = _case("nowhere", True)
    E, I = t["w"].shape[0], t["h"].shape[1]
    g = torch.Generator().manual_seed(2)
    h, w, b = t["h"].float(), torch.randn(E, 24, I, generator=g), torch.randn(E, 24, generator=g)
    args = [a.to(DEVICE) for a in (h, w, b, offsets, row_slot, t["weights"].float())]
    dout = torch.randn(t["weights"].shape[0], 24, generator=g).to(DEVICE)
    dh_all, _, _, dweights_all = grouped_linear_combine_backward(dout, *args, True, False, False, True)
    dh, dw, db, dweights = grouped_linear_combine_backward(dout, *args, need_h, False, False, need_weights)
    assert dw.numel() == 0 and db.numel() == 0
    if need_h:
        torch.testing.assert_close(dh, dh_all)
        assert dweights.numel() == 0
    else:
        torch.testing.assert_close(dweights, dweights_all)
        assert dh.numel() == 0


def test_row_dots_add_every_column_tile():
    """``segment_matmul_row_dots`` with N = 200 (four 64-wide column tiles, the last partial), a
    gather, a scale and dropped rows, against a float64 loop over the rows."""
    from moefx.kernels.triton.grouped_linear import segment_matmul_row_dots

    g = torch.Generator().manual_seed(3)
    T, K, N, E, sizes = 30, 24, 200, 3, [20, 0, 31]
    S = sum(sizes) + 9  # the last 9 rows are dropped
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    a, b = torch.randn(T, K, generator=g, dtype=torch.float64), torch.randn(E, K, N, generator=g, dtype=torch.float64)
    rows, scale = torch.randint(0, T, (S,), generator=g), torch.rand(S, generator=g, dtype=torch.float64)
    dot_with = torch.randn(S, N, generator=g, dtype=torch.float64)
    want_out, want_dots = torch.zeros(S, N, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    for e in range(E):
        for r in range(int(offsets[e]), int(offsets[e + 1])):
            y = a[rows[r]] @ b[e]
            want_out[r], want_dots[r] = y * scale[r], (y * dot_with[r]).sum()
    out, dots = segment_matmul_row_dots(*(t.float().to(DEVICE) for t in (a, b)), offsets.to(DEVICE),
                                        dot_with.float().to(DEVICE), a_rows_S=rows.to(DEVICE),
                                        scale_S=scale.float().to(DEVICE))
    assert dots.dtype == torch.float32
    _check(out, want_out, torch.float32)
    _check(dots, want_dots, torch.float32)
