"""Learnable scale / zero point (LSQ): the backward kernel and its deterministic reduction.

The forward of the learnable op is plain fake quant with the rounded zero point and runs
kernels/fake_quant.py's forward kernel. The backward kernel computes dx and the per-element
scale and zero-point gradient terms of triton_qat.numerics.reference.learnable_grad_terms_ref, and
sums the terms of each tile per channel (tl.sum, a fixed tree) into a buffer of partial
sums; the launcher then sums the partials in a fixed order. No atomics: the same inputs give
the same bits on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_qat.kernels.fake_quant import (
    blocks,
    launch,
    load_param,
    quantize_unclamped,
    tile_coords,
    x_tile_and_params,
)
from triton_qat.kernels.rounding import cast_rne, fma_rn, negate, to_fp32
from triton_qat.numerics.qparams import NormQParams


@triton.jit
def _store_partial(
    part_ptr,
    terms,
    pid,
    rows,
    cols,
    PARAMS_ON_COLS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Sum a tile's terms per channel into the partial buffer: (n_row_blocks, cols) when the
    params run along the columns, else (rows, n_col_blocks)."""
    pid_r, pid_c, r, c = tile_coords(pid, cols, BLOCK_R, BLOCK_C)
    if PARAMS_ON_COLS:
        tl.store(part_ptr + pid_r * cols + c, tl.sum(terms, axis=0), mask=c < cols)
    else:
        n_col_blocks = tl.cdiv(cols, BLOCK_C)
        tl.store(part_ptr + r * n_col_blocks + pid_c, tl.sum(terms, axis=1), mask=r < rows)


@triton.jit
def learnable_fake_quant_bwd_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    dscale_part_ptr,
    dzp_part_ptr,
    scale_ptr,
    inv_ptr,
    zp_ptr,
    rows,
    cols,
    channels,
    qmin,
    qmax,
    grad_factor,
    PARAMS_ON_COLS: tl.constexpr,
    FLOAT_ZP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    x, inv, zp, offs, mask, pidx, p_ok = x_tile_and_params(
        pid, x_ptr, inv_ptr, zp_ptr, rows, cols, channels, PARAMS_ON_COLS, BLOCK_R, BLOCK_C
    )
    scale = load_param(scale_ptr, pidx, p_ok, 1.0, PARAMS_ON_COLS)
    dy = to_fp32(tl.load(dy_ptr + offs, mask=mask, other=0.0))
    # FLOAT_ZP is set by the launcher: torch adds the zero point before rounding here.
    xq = quantize_unclamped(x, inv, zp, FLOAT_ZP)
    at_least_min = xq >= qmin
    keep = at_least_min & (xq <= qmax)
    # NaN fails both comparisons: clamped to qmin and counted as below the range.
    q = tl.where(xq > qmax, qmax, tl.where(at_least_min, xq, qmin))
    in_range = (dy * fma_rn(q - zp, scale, negate(x))) * inv
    saturated = tl.where(at_least_min, dy * (qmax - zp), dy * (qmin - zp))
    dscale = tl.where(keep, in_range, saturated) * grad_factor
    dzp = tl.where(keep, 0.0, (dy * negate(scale)) * grad_factor)
    dscale = tl.where(mask, dscale, 0.0)
    dzp = tl.where(mask, dzp, 0.0)
    _store_partial(dscale_part_ptr, dscale, pid, rows, cols, PARAMS_ON_COLS, BLOCK_R, BLOCK_C)
    _store_partial(dzp_part_ptr, dzp, pid, rows, cols, PARAMS_ON_COLS, BLOCK_R, BLOCK_C)
    # dy * mask rather than a select, as torch: NaN or inf gradients stay NaN where clamped.
    dx = dy * keep.to(tl.float32)
    tl.store(dx_ptr + offs, cast_rne(dx, dx_ptr.dtype.element_ty), mask=mask)


def learnable_fake_quant_backward(
    x: Tensor, grad_y: Tensor, nq: NormQParams, inv_scale: Tensor, grad_factor: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dscale, dzp): dx in grad_y's dtype shaped as x, dscale / dzp fp32 of shape
    (channels,). nq.zero_point: the backward's rounded zero point, fp32 (float_zero_point)."""
    x = x.contiguous()
    grad_y = grad_y.contiguous()
    grad_x = torch.empty_like(grad_y)
    block_r, block_c, _ = blocks(nq)
    if nq.params_on_cols:
        part_shape = (triton.cdiv(nq.rows, block_r), nq.cols)
    else:
        part_shape = (nq.rows, triton.cdiv(nq.cols, block_c))
    dscale_part = x.new_zeros(part_shape, dtype=torch.float32)
    dzp_part = x.new_zeros(part_shape, dtype=torch.float32)
    if x.numel():
        tensors = (
            x,
            grad_y,
            grad_x,
            dscale_part,
            dzp_part,
            nq.scale,
            inv_scale,
            nq.zero_point.to(torch.float32),
        )
        # grad_factor rounded to fp32 here, as torch's kernel takes it.
        gf = float(torch.tensor(grad_factor, dtype=torch.float32))
        launch(learnable_fake_quant_bwd_kernel, tensors, nq._replace(float_zero_point=True), (gf,))
    # The second stage: fixed-shape sums over the partials, deterministic on every device.
    if nq.params_on_cols:
        return grad_x, dscale_part.sum(0), dzp_part.sum(0)
    dims = (0, 2)
    view = (-1, nq.channels, part_shape[1])
    return grad_x, dscale_part.view(view).sum(dims), dzp_part.view(view).sum(dims)
