"""Standalone fake quantization: forward and straight-through backward kernels.

The input, made contiguous, is seen as a (rows, cols) matrix; the qparam index of an element
is `row % channels`, or `col` when PARAMS_ON_COLS (see triton_qat.numerics.qparams.NormQParams).
That one layout covers per tensor (one channel), per channel along any axis and per group.
The backward kernel recomputes the mask from x: no mask tensor is ever stored. The codes
kernel writes the integer codes clamp(q) behind the fake quant (int8, optionally shifted),
the operand of the integer GEMMs in kernels/int_matmul.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_qat.kernels.rounding import cast_rne, fma_rn, round_half_even_then_clamped, to_fp32
from triton_qat.numerics.qparams import NormQParams

_TILE_ELEMENTS = 4096
_MAX_BLOCK_COLS = 2048


@triton.jit
def quantize_unclamped(xf, inv_scale, zp, FLOAT_ZP: tl.constexpr):
    """Integer-valued fp32 q before clamping, as triton_qat.numerics.reference.quantize_unclamped.

    Exact wherever it matters: the caller clamps to [qmin, qmax] within +-2**20 (QParams
    enforces it), so the two-op rounding's liberty beyond 2**22 never shows.
    """
    if FLOAT_ZP:
        # One fused multiply-add, as torch; the rounding yields +0.0, never -0.0.
        qf = round_half_even_then_clamped(fma_rn(xf, inv_scale, zp))
    else:
        qf = round_half_even_then_clamped(xf * inv_scale) + zp
    return qf


@triton.jit
def clamp_codes(qf, qmin, qmax):
    """clamp(q, qmin, qmax) of integer-valued fp32 q, as numerics.reference.clamp_quantized:
    NaN fails both comparisons and lands on qmin, as fmin(fmax(NaN, qmin), qmax) does."""
    return tl.where(qf > qmax, qmax, tl.where(qf >= qmin, qf, qmin))


@triton.jit
def fake_quant_values(xf, inv_scale, scale, zp, qmin, qmax, FLOAT_ZP: tl.constexpr):
    """fp32 fake quant of an fp32 tile: (y, mask), as numerics.reference.fake_quant_core."""
    qf = quantize_unclamped(xf, inv_scale, zp, FLOAT_ZP)
    mask = (qf >= qmin) & (qf <= qmax)
    q = clamp_codes(qf, qmin, qmax)
    if FLOAT_ZP:
        # torch dequantizes in float64 here; (q - zp) is not exact in fp32 for a float zp.
        y = ((q.to(tl.float64) - zp.to(tl.float64)) * scale.to(tl.float64)).to(tl.float32)
    else:
        y = (q - zp) * scale
    return y, mask


@triton.jit
def tile_coords(pid, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(pid_r, pid_c, rows r, cols c) of program `pid`'s tile, row blocks outermost."""
    n_col_blocks = tl.cdiv(cols, BLOCK_C)
    pid_r = pid // n_col_blocks
    pid_c = pid % n_col_blocks
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return pid_r, pid_c, r, c


@triton.jit
def tile(
    pid,
    rows,
    cols,
    channels,
    PARAMS_ON_COLS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Offsets, element mask, param index and param mask of program `pid`'s tile (int64)."""
    _, _, r, c = tile_coords(pid, cols, BLOCK_R, BLOCK_C)
    r_ok = r < rows
    c_ok = c < cols
    offs = r[:, None] * cols + c[None, :]
    mask = r_ok[:, None] & c_ok[None, :]
    if PARAMS_ON_COLS:
        pidx = c
        p_ok = c_ok
    else:
        pidx = r % channels
        p_ok = r_ok
    return offs, mask, pidx, p_ok


@triton.jit
def load_param(ptr, pidx, p_ok, other, PARAMS_ON_COLS: tl.constexpr):
    p = tl.load(ptr + pidx, mask=p_ok, other=other).to(tl.float32)
    if PARAMS_ON_COLS:
        return p[None, :]
    else:
        return p[:, None]


@triton.jit
def x_tile_and_params(
    pid,
    x_ptr,
    inv_ptr,
    zp_ptr,
    rows,
    cols,
    channels,
    PARAMS_ON_COLS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program pid's tile of x in fp32 with its 1 / scale and zero point, plus tile()'s
    offsets, element mask, param index and param mask."""
    offs, mask, pidx, p_ok = tile(pid, rows, cols, channels, PARAMS_ON_COLS, BLOCK_R, BLOCK_C)
    inv = load_param(inv_ptr, pidx, p_ok, 1.0, PARAMS_ON_COLS)
    zp = load_param(zp_ptr, pidx, p_ok, 0, PARAMS_ON_COLS)
    x = to_fp32(tl.load(x_ptr + offs, mask=mask, other=0.0))
    return x, inv, zp, offs, mask, pidx, p_ok


@triton.jit
def fake_quant_fwd_kernel(
    x_ptr,
    y_ptr,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    rows,
    cols,
    channels,
    qmin,
    qmax,
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
    y, _ = fake_quant_values(x, inv, scale, zp, qmin, qmax, FLOAT_ZP)
    tl.store(y_ptr + offs, cast_rne(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fake_quant_bwd_kernel(
    x_ptr,
    dy_ptr,
    dx_ptr,
    inv_ptr,
    zp_ptr,
    rows,
    cols,
    channels,
    qmin,
    qmax,
    PARAMS_ON_COLS: tl.constexpr,
    FLOAT_ZP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    x, inv, zp, offs, mask, _, _ = x_tile_and_params(
        pid, x_ptr, inv_ptr, zp_ptr, rows, cols, channels, PARAMS_ON_COLS, BLOCK_R, BLOCK_C
    )
    dy = to_fp32(tl.load(dy_ptr + offs, mask=mask, other=0.0))
    qf = quantize_unclamped(x, inv, zp, FLOAT_ZP)
    keep = (qf >= qmin) & (qf <= qmax)
    # dy * mask rather than a select, as torch: NaN or inf gradients stay NaN where clamped.
    dx = dy * keep.to(tl.float32)
    tl.store(dx_ptr + offs, cast_rne(dx, dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def quantized_codes_kernel(
    x_ptr,
    q_ptr,
    inv_ptr,
    zp_ptr,
    rows,
    cols,
    channels,
    qmin,
    qmax,
    shift,
    PARAMS_ON_COLS: tl.constexpr,
    FLOAT_ZP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """int8 codes clamp(q) - shift, as triton_qat.numerics.reference.quantized_codes_ref."""
    pid = tl.program_id(0).to(tl.int64)
    x, inv, zp, offs, mask, _, _ = x_tile_and_params(
        pid, x_ptr, inv_ptr, zp_ptr, rows, cols, channels, PARAMS_ON_COLS, BLOCK_R, BLOCK_C
    )
    q = clamp_codes(quantize_unclamped(x, inv, zp, FLOAT_ZP), qmin, qmax) - shift
    tl.store(q_ptr + offs, q.to(tl.int32).to(tl.int8), mask=mask)


def blocks(nq: NormQParams) -> tuple[int, int, int]:
    block_c = min(triton.next_power_of_2(max(nq.cols, 1)), _MAX_BLOCK_COLS)
    block_r = max(1, min(triton.next_power_of_2(max(nq.rows, 1)), _TILE_ELEMENTS // block_c))
    n_programs = triton.cdiv(nq.rows, block_r) * triton.cdiv(nq.cols, block_c)
    return block_r, block_c, n_programs


def launch(kernel, tensors: tuple[Tensor, ...], nq: NormQParams, scalars: tuple = ()) -> None:
    """One program per (BLOCK_R, BLOCK_C) tile of blocks(nq): kernel(*tensors, rows, cols,
    channels, qmin, qmax, *scalars, PARAMS_ON_COLS, FLOAT_ZP, BLOCK_R, BLOCK_C)."""
    block_r, block_c, n_programs = blocks(nq)
    kernel[(n_programs,)](
        *tensors,
        nq.rows,
        nq.cols,
        nq.channels,
        float(nq.quant_min),
        float(nq.quant_max),
        *scalars,
        PARAMS_ON_COLS=nq.params_on_cols,
        FLOAT_ZP=nq.float_zero_point,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=8 if block_r * block_c >= 4096 else 4,
        # No FMA contraction beyond the explicit tl.fma: bit-exactness with the reference.
        enable_fp_fusion=False,
    )


def fake_quant_forward(x: Tensor, nq: NormQParams, inv_scale: Tensor) -> Tensor:
    """Fake-quantized copy of x (contiguous, x's dtype). A non-contiguous x is copied first."""
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        launch(fake_quant_fwd_kernel, (x, y, inv_scale, nq.scale, nq.zero_point), nq)
    return y


def fake_quant_backward(x: Tensor, grad_y: Tensor, nq: NormQParams, inv_scale: Tensor) -> Tensor:
    """grad_y * mask(x), with the mask recomputed from x; in grad_y's dtype."""
    x = x.contiguous()
    grad_y = grad_y.contiguous()
    grad_x = torch.empty_like(grad_y)
    if x.numel():
        launch(fake_quant_bwd_kernel, (x, grad_y, grad_x, inv_scale, nq.zero_point), nq)
    return grad_x


def quantized_codes(x: Tensor, nq: NormQParams, inv_scale: Tensor, shift: int = 0) -> Tensor:
    """The codes clamp(q) - shift behind fake_quant_forward(x), int8 in x's shape (the caller
    picks `shift` so that [quant_min - shift, quant_max - shift] lies within int8)."""
    x = x.contiguous()
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if x.numel():
        launch(quantized_codes_kernel, (x, codes, inv_scale, nq.zero_point), nq, (float(shift),))
    return codes
