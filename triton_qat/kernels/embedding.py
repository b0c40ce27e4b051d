"""Fake-quantized embedding lookup: gather the looked-up rows and fake-quantize them with their
own qparams (never the whole table), and the straight-through weight gradient.

Qparams layout: the qparam of table element (row, col) sits at `row * params_per_row +
col // group_size` of the flat scale / zero point: per tensor (0, dim), per row (1, dim),
per column (0, 1), per group along the row (dim // g, g).

The dense weight gradient is a segmented sum over the sorted indices: one program per
(distinct row, column block) adds that row's incoming gradients in index order, in fp32, and
writes the row once. No atomics: the result is the same at every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_qat.kernels.fake_quant import fake_quant_values, quantize_unclamped
from triton_qat.kernels.rounding import cast_rne, to_fp32

# 16 rows x up to 128 columns a program: at 32 x 256 the gather spilled (sm_90, 4 warps).
_BLOCK_N = 16
_MAX_BLOCK_D = 128


@triton.jit
def _row_tile_params(
    rows,
    d,
    ok,
    inv_ptr,
    zp_ptr,
    params_per_row,
    group_size,
):
    """1 / scale and the zero point (fp32) of the table elements (rows[:, None], d[None, :])."""
    pidx = rows[:, None] * params_per_row + (d // group_size)[None, :]
    inv = tl.load(inv_ptr + pidx, mask=ok, other=1.0).to(tl.float32)
    zp = tl.load(zp_ptr + pidx, mask=ok, other=0).to(tl.float32)
    return pidx, inv, zp


@triton.jit
def embedding_fq_gather_kernel(
    idx_ptr,
    w_ptr,
    dy_ptr,
    out_ptr,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    n_idx,
    dim,
    params_per_row,
    group_size,
    qmin,
    qmax,
    FLOAT_ZP: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[i] = fq(w[idx[i]]) (GRAD False), or dy[i] * mask(w[idx[i]]) (GRAD True)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < n_idx
    ok = n_ok[:, None] & (d < dim)[None, :]
    rows = tl.load(idx_ptr + n, mask=n_ok, other=0).to(tl.int64)
    pidx, inv, zp = _row_tile_params(rows, d, ok, inv_ptr, zp_ptr, params_per_row, group_size)
    x = to_fp32(tl.load(w_ptr + rows[:, None] * dim + d[None, :], mask=ok, other=0.0))
    out_offs = n[:, None] * dim + d[None, :]
    if GRAD:
        qf = quantize_unclamped(x, inv, zp, FLOAT_ZP)
        keep = (qf >= qmin) & (qf <= qmax)
        dy = to_fp32(tl.load(dy_ptr + out_offs, mask=ok, other=0.0))
        # dy * mask rather than a select, as torch: NaN or inf gradients stay NaN where clamped.
        tl.store(
            out_ptr + out_offs,
            cast_rne(dy * keep.to(tl.float32), out_ptr.dtype.element_ty),
            mask=ok,
        )
    else:
        scale = tl.load(scale_ptr + pidx, mask=ok, other=1.0).to(tl.float32)
        y, _ = fake_quant_values(x, inv, scale, zp, qmin, qmax, FLOAT_ZP)
        tl.store(out_ptr + out_offs, cast_rne(y, out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def embedding_fq_dw_kernel(
    dy_ptr,
    order_ptr,
    seg_start_ptr,
    seg_row_ptr,
    w_ptr,
    dw_ptr,
    inv_ptr,
    zp_ptr,
    dim,
    params_per_row,
    group_size,
    qmin,
    qmax,
    FLOAT_ZP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dw[row] = sum of dy[i] over the indices i looking up `row` (in index order, fp32), cast
    to dw's dtype, times the row's straight-through mask; one program per (row, column block)."""
    seg = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    row = tl.load(seg_row_ptr + seg).to(tl.int64)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(start, end):
        src = tl.load(order_ptr + j).to(tl.int64)
        acc += to_fp32(tl.load(dy_ptr + src * dim + d, mask=d_ok, other=0.0))
    rows = tl.zeros((1,), dtype=tl.int64) + row
    _, inv, zp = _row_tile_params(
        rows, d, d_ok[None, :], inv_ptr, zp_ptr, params_per_row, group_size
    )
    x = to_fp32(tl.load(w_ptr + row * dim + d[None, :], mask=d_ok[None, :], other=0.0))
    qf = quantize_unclamped(x, inv, zp, FLOAT_ZP)
    keep = ((qf >= qmin) & (qf <= qmax)).to(tl.float32)
    # The sum is rounded to dw's dtype before the mask, as the unfused embedding backward.
    total = to_fp32(cast_rne(acc[None, :], dw_ptr.dtype.element_ty))
    dw = cast_rne(total * keep, dw_ptr.dtype.element_ty)
    tl.store(dw_ptr + row * dim + d[None, :], dw, mask=d_ok[None, :])


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(max(dim, 1)), _MAX_BLOCK_D)


def _launch_options() -> dict:
    # No FMA contraction beyond the explicit tl.fma: bit-exactness with the reference.
    return {"num_warps": 4, "enable_fp_fusion": False}


def embedding_fq_forward(
    idx: Tensor,
    weight: Tensor,
    scale: Tensor,
    inv_scale: Tensor,
    zero_point: Tensor,
    layout: tuple[int, int],
    quant_min: int,
    quant_max: int,
) -> Tensor:
    """fq(weight)[idx] for a flat int64 idx of valid rows: (idx.numel(), dim), weight's dtype.
    `layout` is (params_per_row, group_size) of the flat qparams (see the module docstring)."""
    n, dim = idx.numel(), weight.shape[1]
    out = torch.empty((n, dim), dtype=weight.dtype, device=weight.device)
    if n and dim:
        _gather(idx, weight, None, out, scale, inv_scale, zero_point, layout, quant_min, quant_max)
    return out


def embedding_fq_grad_rows(
    idx: Tensor,
    weight: Tensor,
    grad_out: Tensor,
    inv_scale: Tensor,
    zero_point: Tensor,
    layout: tuple[int, int],
    quant_min: int,
    quant_max: int,
) -> Tensor:
    """grad_out * mask(weight[idx]): the straight-through gradient of each looked-up row,
    (idx.numel(), dim) in grad_out's dtype (for the sparse and the frequency-scaled backward)."""
    n, dim = idx.numel(), weight.shape[1]
    out = torch.empty((n, dim), dtype=grad_out.dtype, device=weight.device)
    if n and dim:
        _gather(
            idx,
            weight,
            grad_out,
            out,
            inv_scale,
            inv_scale,
            zero_point,
            layout,
            quant_min,
            quant_max,
        )
    return out


def _gather(idx, weight, grad_out, out, scale, inv_scale, zero_point, layout, qmin, qmax):
    n, dim = idx.numel(), weight.shape[1]
    block_d = _block_d(dim)
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(dim, block_d))
    embedding_fq_gather_kernel[grid](
        idx,
        weight,
        out if grad_out is None else grad_out,
        out,
        inv_scale,
        scale,
        zero_point,
        n,
        dim,
        layout[0],
        layout[1],
        float(qmin),
        float(qmax),
        FLOAT_ZP=zero_point.dtype == torch.float32,
        GRAD=grad_out is not None,
        BLOCK_N=_BLOCK_N,
        BLOCK_D=block_d,
        **_launch_options(),
    )


def embedding_fq_dense_grad(
    idx: Tensor,
    weight: Tensor,
    grad_out: Tensor,
    inv_scale: Tensor,
    zero_point: Tensor,
    layout: tuple[int, int],
    quant_min: int,
    quant_max: int,
) -> Tensor:
    """The dense weight gradient (num_embeddings, dim) in weight's dtype: rows looked up by a
    flat int64 idx (padding entries already removed) get the sum of their grad_out rows times
    their straight-through mask, every other row 0. Deterministic (sorted segments)."""
    dim = weight.shape[1]
    dw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    if idx.numel() == 0 or dim == 0:
        return dw
    sorted_idx, order = torch.sort(idx, stable=True)
    rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    seg_start = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=seg_start[1:])
    block_d = _block_d(dim)
    grid = (rows.numel(), triton.cdiv(dim, block_d))
    embedding_fq_dw_kernel[grid](
        grad_out,
        order,
        seg_start,
        rows,
        weight,
        dw,
        inv_scale,
        zero_point,
        dim,
        layout[0],
        layout[1],
        float(quant_min),
        float(quant_max),
        FLOAT_ZP=zero_point.dtype == torch.float32,
        BLOCK_D=block_d,
        **_launch_options(),
    )
    return dw
