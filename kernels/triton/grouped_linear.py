"""Triton kernels for ``moefx::grouped_linear`` and its backward, over variable-size expert segments.

Legend: S rows, I in features, O out features, E experts, BM/BN/BK tile sizes.

No device-to-host sync: the launch grid is an upper bound known from shapes alone (the experts'
rows and the dropped rows are E + 1 segments, each with at most one partial row tile, so at most
``cdiv(S, BM) + E`` row tiles: ``row_tiles_bound``), and each program finds its expert and tile
from the offsets on the device. The programs after the experts' tiles zero the dropped rows;
those past them return at once (up to E row tiles' worth: about E/2 when every expert has rows,
nearly all of the grid when few rows meet many experts).

Program order, for the L2 cache: ``segment_matmul`` runs on a 1-D grid in groups of ``GROUP_M``
row tiles, all column tiles of a group before the next group (the Triton tutorial's grouped
ordering), so a row tile is read from memory about once rather than once per column tile.
``segment_outer`` puts the in-features tile first in launch order, so neighbouring programs
share the expert and its ``dy`` columns. Memory offsets that scale with a tensor's size (an
expert's weight, a row) are int64: ``E * O * I`` passes 2^31 at fine-grained shapes.

- ``segment_matmul``: ``out[r] = a[r] @ B_e (+ bias[e])`` for the rows r of expert e, where B_e
  is read through strides, so the forward (``B_e = W[e]^T``) and dX (``B_e = W[e]``) are one kernel.
  Rows past ``offsets[E]`` are written as zeros. ``segment_matmul_row_dots`` also returns each
  row's dot with a given ``[S, N]`` tensor, taken from the accumulator in the epilogue.
- ``segment_outer``: ``dW[e] = dY_e^T @ X_e`` (and ``db[e] = sum dY_e``), one program per
  (expert, tile of dW): a loop over the expert's rows, so the reduction order is fixed
  (deterministic, no atomics).

The in-features loop bound is a ``constexpr`` (one compile per feature size); the row loop of
``segment_outer`` runs over bounds read from the offsets with ``tl.range``, which Triton
pipelines like any other loop (the interpreter runs it too).

Accumulation is fp32 whatever the input dtype. Tile sizes: ``moefx.kernels.cuda.tuning``
(candidates per kernel, timed on the GPU once per shape). The CUDA registration lives in
``moefx.kernels.cuda.registration``. The kernels also run on CPU tensors under ``TRITON_INTERPRET=1``,
which is how CI tests them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from moefx.kernels.cuda.tuning import TILES, TileConfig, can_time, matmul_candidates, outer_candidates, rows_bucket

GROUP_M = 8  # row tiles per group of segment_matmul's launch order (the Triton tutorial's value)


@triton.jit
def _segment_matmul_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, offsets_ptr, a_rows_ptr, out_rows_ptr, scale_ptr, dot_with_ptr, dots_ptr,
    S, N, E, M_TILES, K: tl.constexpr,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_om, stride_on, stride_dm, stride_dn,
    HAS_BIAS: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_OUT: tl.constexpr, SCALE: tl.constexpr,
    ROW_DOTS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles, each with all its column tiles, then the next group.
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(N, BN)
    in_group = GROUP_M * col_tiles
    group_start = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(M_TILES - group_start, GROUP_M)
    tile = group_start + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    experts = tl.arange(0, BE)
    starts = tl.load(offsets_ptr + experts, mask=experts < E, other=0).to(tl.int64)
    ends = tl.load(offsets_ptr + experts + 1, mask=experts < E, other=0).to(tl.int64)
    tiles = tl.where(experts < E, (ends - starts + BM - 1) // BM, 0)
    first_tile = tl.cumsum(tiles, 0) - tiles
    real_tiles = tl.sum(tiles, 0)
    cols = pid_n * BN + tl.arange(0, BN)
    if tile < real_tiles:
        # The expert whose tiles contain this one: the last with first_tile <= tile and tiles > 0.
        e = tl.max(tl.where((first_tile <= tile) & (tiles > 0), experts, -1), 0)
        start = tl.sum(tl.where(experts == e, starts, 0), 0)
        end = tl.sum(tl.where(experts == e, ends, 0), 0)
        e_first = tl.sum(tl.where(experts == e, first_tile, 0), 0)
        rows = start + (tile - e_first) * BM + tl.arange(0, BM)
        row_ok = rows < end
        a_rows = rows
        if GATHER_A:  # the gather fused into the loads: row r reads a[a_rows[r]]
            a_rows = tl.load(a_rows_ptr + rows, mask=row_ok, other=0)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)
            b = tl.load(b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
            if IEEE:  # fp32 in, fp32 math (torch's default); otherwise TF32 on recent GPUs
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if ROW_DOTS:  # this column tile's share of rowsum(result * dot_with), before the scale
            other = tl.load(dot_with_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
                            mask=row_ok[:, None] & (cols[None, :] < N), other=0.0)
            tl.store(dots_ptr + rows * col_tiles + pid_n, tl.sum(acc * other.to(tl.float32), 1), mask=row_ok)
        if SCALE:  # a per-row factor (the routing weight) in the epilogue
            acc *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        out_rows = rows
        if SCATTER_OUT:  # row r is stored at out[out_rows[r]] (a permutation: no two rows collide)
            out_rows = tl.load(out_rows_ptr + rows, mask=row_ok, other=0)
        tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols[None, :] < N))
    else:
        # The next programs zero the dropped rows [offsets[E], S), one row tile each; the rest
        # (rows past S) store nothing. Kept apart from the matmul's branch: nested in it, this
        # raised the matmul's register count in an sm_90 compile.
        kept = tl.load(offsets_ptr + E).to(tl.int64)
        rows = kept + (tile - real_tiles) * BM + tl.arange(0, BM)
        out_rows = rows
        if SCATTER_OUT:
            out_rows = tl.load(out_rows_ptr + rows, mask=rows < S, other=0)
        zeros = tl.zeros((BM, BN), dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on, zeros,
                 mask=(rows[:, None] < S) & (cols[None, :] < N))
        if ROW_DOTS:
            tl.store(dots_ptr + rows * col_tiles + pid_n, tl.zeros((BM,), dtype=tl.float32), mask=rows < S)


def row_tiles_bound(rows: int, block_rows: int, num_experts: int) -> int:
    """Row tiles that cover every expert's rows and then the dropped rows, whatever the offsets:
    E + 1 segments of ``rows`` rows in all, each adding at most one partial tile."""
    return triton.cdiv(rows, block_rows) + num_experts


def segment_matmul(
    a_MK: Tensor, b_EKN: Tensor, bias_EN: Tensor | None, offsets_E1: Tensor, *,
    a_rows_S: Tensor | None = None, out_rows_S: Tensor | None = None, scale_S: Tensor | None = None,
) -> Tensor:
    """``out[r] = a[r] @ b[e] (+ bias[e])`` per expert segment; ``b`` may be any strided view.

    Options, each fused into the kernel: ``a_rows_S`` gathers (row r reads ``a[a_rows_S[r]]``,
    so ``a`` may have any number of rows), ``scale_S`` multiplies row r's result by
    ``scale_S[r]``, and ``out_rows_S`` (a permutation of the S rows) stores row r at
    ``out[out_rows_S[r]]``."""
    return _segment_matmul(a_MK, b_EKN, bias_EN, offsets_E1, a_rows_S, out_rows_S, scale_S, None)[0]


def segment_matmul_row_dots(
    a_MK: Tensor, b_EKN: Tensor, offsets_E1: Tensor, dot_with_SN: Tensor, *,
    a_rows_S: Tensor | None = None, scale_S: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out, dots_S)``: ``segment_matmul``'s ``out`` and, from the same fp32 accumulator before
    the scale, ``dots_S[r] = sum_n (a[r] @ b[e])[n] * dot_with_SN[r, n]`` in fp32 (zero for dropped
    rows). Each program stores its column tile's partial sum and one ``sum`` adds them after the
    kernel (deterministic for a given shape): no ``[S, N]`` fp32 product exists and no atomics
    are used."""
    out, partials = _segment_matmul(a_MK, b_EKN, None, offsets_E1, a_rows_S, None, scale_S, dot_with_SN)
    return out, partials.sum(1)


def _segment_matmul(
    a_MK: Tensor, b_EKN: Tensor, bias_EN: Tensor | None, offsets_E1: Tensor, a_rows_S: Tensor | None,
    out_rows_S: Tensor | None, scale_S: Tensor | None, dot_with_SN: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    K = a_MK.shape[1]
    S = a_MK.shape[0] if a_rows_S is None else a_rows_S.shape[0]
    E, _, N = b_EKN.shape
    out = a_MK.new_empty((S, N))
    partials: dict[str, Tensor] = {}  # the last launch's row-dot partials [S, column tiles]
    unused = offsets_E1  # any tensor stands in for a pointer the kernel does not read
    dot_with = dot_with_SN if dot_with_SN is not None else out
    flags = dict(HAS_BIAS=bias_EN is not None, GATHER_A=a_rows_S is not None, SCATTER_OUT=out_rows_S is not None,
                 SCALE=scale_S is not None, ROW_DOTS=dot_with_SN is not None, IEEE=a_MK.dtype == torch.float32)

    def launch(config: TileConfig) -> None:
        m_tiles = row_tiles_bound(S, config.BM, E)
        dots = out.new_empty((S, triton.cdiv(N, config.BN)), dtype=torch.float32) if flags["ROW_DOTS"] else unused
        partials["dots"] = dots
        _segment_matmul_kernel[(m_tiles * triton.cdiv(N, config.BN),)](
            a_MK, b_EKN, bias_EN.contiguous() if bias_EN is not None else unused, out, offsets_E1,
            unused if a_rows_S is None else a_rows_S, unused if out_rows_S is None else out_rows_S,
            unused if scale_S is None else scale_S, dot_with, dots,
            S, N, E, m_tiles, K,
            a_MK.stride(0), a_MK.stride(1), b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2), out.stride(0), out.stride(1),
            dot_with.stride(0), dot_with.stride(1),
            **flags, BM=config.BM, BN=config.BN, BK=config.BK, BE=triton.next_power_of_2(E), GROUP_M=GROUP_M,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )

    key = ("matmul", N, K, E, rows_bucket(S), a_MK.dtype, b_EKN.stride(1) == 1, *flags.values())
    launch(TILES.choose(key, matmul_candidates(S, N, K), launch, can_time(a_MK.device)))
    return out, partials["dots"] if flags["ROW_DOTS"] else None


@triton.jit
def _segment_outer_kernel(
    dy_ptr, x_ptr, offsets_ptr, dw_ptr, db_ptr, dy_rows_ptr, x_rows_ptr, scale_ptr,
    O, I,
    stride_dym, stride_dyo, stride_xm, stride_xi, stride_dwe, stride_dwo, stride_dwi,
    HAS_BIAS: tl.constexpr, GATHER_DY: tl.constexpr, GATHER_X: tl.constexpr, SCALE: tl.constexpr,
    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_i = tl.program_id(0)  # fastest in launch order: neighbours share e and the dy columns
    pid_o = tl.program_id(1)
    e = tl.program_id(2)
    start = tl.load(offsets_ptr + e).to(tl.int64)
    end = tl.load(offsets_ptr + e + 1).to(tl.int64)
    outs = pid_o * BM + tl.arange(0, BM)
    ins = pid_i * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    bias_acc = tl.zeros((BM,), dtype=tl.float32)
    for r0 in tl.range(start, end, BK):
        rows = r0 + tl.arange(0, BK)
        row_ok = rows < end
        dy_rows, x_rows = rows, rows
        if GATHER_DY:
            dy_rows = tl.load(dy_rows_ptr + rows, mask=row_ok, other=0)
        if GATHER_X:
            x_rows = tl.load(x_rows_ptr + rows, mask=row_ok, other=0)
        dy = tl.load(dy_ptr + dy_rows[:, None] * stride_dym + outs[None, :] * stride_dyo,
                     mask=row_ok[:, None] & (outs[None, :] < O), other=0.0)
        if SCALE:  # per-row factor on dy (the routing weight), in the input dtype like dy itself
            dy = (dy.to(tl.float32) * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]).to(dy.dtype)
        x = tl.load(x_ptr + x_rows[:, None] * stride_xm + ins[None, :] * stride_xi,
                    mask=row_ok[:, None] & (ins[None, :] < I), other=0.0)
        if IEEE:
            acc = tl.dot(tl.trans(dy), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(dy), x, acc)
        if HAS_BIAS:
            bias_acc += tl.sum(dy.to(tl.float32), 0)
    tl.store(dw_ptr + e.to(tl.int64) * stride_dwe + outs[:, None] * stride_dwo + ins[None, :] * stride_dwi,
             acc.to(dw_ptr.dtype.element_ty), mask=(outs[:, None] < O) & (ins[None, :] < I))
    if HAS_BIAS:
        if pid_i == 0:
            tl.store(db_ptr + e * O + outs, bias_acc.to(db_ptr.dtype.element_ty), mask=outs < O)


def segment_outer(
    dy_MO: Tensor, x_NI: Tensor, offsets_E1: Tensor, num_experts: int, with_bias: bool, *,
    dy_rows_S: Tensor | None = None, x_rows_S: Tensor | None = None, scale_S: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(dW [E, O, I], db [E, O] or None)``: per expert, its rows' ``dy^T @ x`` and ``sum dy``.

    Fused options: row r reads ``dy[dy_rows_S[r]]`` and ``x[x_rows_S[r]]`` (gathers), and its
    ``dy`` is multiplied by ``scale_S[r]``."""
    O, I = dy_MO.shape[1], x_NI.shape[1]
    S = dy_MO.shape[0] if dy_rows_S is None else dy_rows_S.shape[0]
    dw = x_NI.new_empty((num_experts, O, I))
    db = x_NI.new_empty((num_experts, O)) if with_bias else None
    unused = offsets_E1  # any tensor stands in for a pointer the kernel does not read
    flags = dict(HAS_BIAS=with_bias, GATHER_DY=dy_rows_S is not None, GATHER_X=x_rows_S is not None,
                 SCALE=scale_S is not None, IEEE=x_NI.dtype == torch.float32)

    def launch(config: TileConfig) -> None:
        grid = (triton.cdiv(I, config.BN), triton.cdiv(O, config.BM), num_experts)
        _segment_outer_kernel[grid](
            dy_MO, x_NI, offsets_E1, dw, db if db is not None else dw,
            unused if dy_rows_S is None else dy_rows_S, unused if x_rows_S is None else x_rows_S,
            unused if scale_S is None else scale_S,
            O, I,
            dy_MO.stride(0), dy_MO.stride(1), x_NI.stride(0), x_NI.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
            **flags, BM=config.BM, BN=config.BN, BK=config.BK, num_warps=config.num_warps, num_stages=config.num_stages,
        )

    key = ("outer", O, I, num_experts, rows_bucket(S), x_NI.dtype, *flags.values())
    launch(TILES.choose(key, outer_candidates(S, O, I), launch, can_time(x_NI.device)))
    return dw, db


def grouped_linear_forward(x_SI: Tensor, weight_EOI: Tensor, bias_EO: Tensor | None, offsets_E1: Tensor) -> Tensor:
    return segment_matmul(x_SI, weight_EOI.transpose(1, 2), bias_EO, offsets_E1)


def grouped_linear_backward(
    grad_y_SO: Tensor, x_SI: Tensor, weight_EOI: Tensor, offsets_E1: Tensor, need_x: bool, need_weight: bool, need_bias: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as the op ``moefx::grouped_linear_backward``: unneeded gradients are empty."""
    grad_x = segment_matmul(grad_y_SO, weight_EOI, None, offsets_E1) if need_x else x_SI.new_empty(0)
    grad_w, grad_b = weight_EOI.new_empty(0), weight_EOI.new_empty(0)
    if need_weight or need_bias:
        dw, db = segment_outer(grad_y_SO, x_SI, offsets_E1, weight_EOI.shape[0], need_bias)
        grad_w = dw if need_weight else grad_w
        grad_b = db if need_bias else grad_b
    return grad_x, grad_w, grad_b
