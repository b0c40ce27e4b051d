"""FP8 kernels: fake quant, float8 codes, the FP8 tensor-core GEMM and the fused FP8 linear.

The numerics are triton_qat/numerics/float_formats.py's, bit for bit:

    scale = max(amax, eps) / fmax                per tensor, or per row of the last dim
    q     = round_to_float8(clamp(x / scale))    true divisions (div_rn), ties to even
    fq(x) = cast(q * scale, x.dtype)

round_to_float8 works in fp32 with the exponent bits (no float8 conversion instruction, so the
interpreter, whose float8 casts do not round to nearest even, gives the same codes as a GPU).
The codes are then stored as float8 (exact: they are float8 values) and read back by the GEMMs:

    float8_codes(x2d, fmt, per_row, eps)     (codes (M, K) float8, scale (M,) fp32)
    fake_quantize_float8(x2d, fmt, ...)      fq(x) in x's dtype, one pass after the scales
    fp8_matmul(xc, sx, wc, sw, b, dtype)     y = (sum_k cx * cw) * sx * sw + b: tl.dot on float8
                                             operands, fp32 accumulation (Hopper / Ada tensor
                                             cores), the scales in the epilogue
    fp8_linear_forward / fp8_linear_backward the fused QAT linear with FP8 weights (per row or
                                             per tensor) and, optionally, FP8 inputs (per token
                                             or per tensor): the float GEMMs of fq_matmul.py
                                             read the operands' float8 codes (W_CODES /
                                             X_CODES), so their tiles are fq(w) / fq(x) in the
                                             input dtype bit for bit; the straight-through
                                             gradient has no mask (dx = dy through the fake
                                             quant: numerics/float_formats.py)
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_qat.kernels import INTERPRETED_KERNELS
from triton_qat.kernels.configs import autotune, int_gemm_configs
from triton_qat.kernels.fq_matmul import (
    QuantizedInput,
    _grid,
    _grouped_pid,
    fq_linear_forward,
    fq_linear_grad_input,
    fq_linear_grad_weight,
)
from triton_qat.kernels.rounding import INTERPRETED, cast_rne, round_half_even, to_fp32
from triton_qat.numerics.float_formats import Float8Format
from triton_qat.numerics.qparams import LinearQuant

NAN: tl.constexpr = tl.constexpr(float("nan"))


@triton.jit
def _pow2(e):
    """2.0**e in fp32 for int32 e in [-126, 127], exact (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def round_to_float8(v, FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """fp32 v saturated to [-FMAX, FMAX] and rounded to the nearest float8 value (MBITS
    mantissa bits, smallest normal exponent EMIN), ties to even; NaN stays NaN, signed zeros
    kept. numerics/float_formats.py round_to_float8_ref, bit for bit."""
    # tl.where, not tl.minimum / tl.maximum: a GPU's min / max drop NaN.
    v = tl.where(v > FMAX, FMAX, tl.where(v < 0.0 - FMAX, 0.0 - FMAX, v))
    # floor(log2 |v|) from the exponent field (fp32 subnormals read -127, then clamped).
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN) - MBITS  # the quantum is 2**e
    # |v| * 2**-e < 2**(MBITS + 1): round_half_even is exact there; both products are exact.
    return round_half_even(v * _pow2(0 - e)) * _pow2(e)


@triton.jit
def float8_rows_kernel(
    x_ptr,
    scale_ptr,
    codes_ptr,
    y_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    stride_cm,
    stride_ck,
    stride_ym,
    stride_yk,
    eps,
    FMAX: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    SCALE_GIVEN: tl.constexpr,
    AMAX_ONLY: tl.constexpr,
    WRITE_CODES: tl.constexpr,
    WRITE_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per block of BLOCK_M rows of x (M, K): the rows' amax (AMAX_ONLY: stored to scale_ptr,
    nothing else), or their scales (SCALE_GIVEN: one scale for the whole tensor at
    scale_ptr[0], else max(amax, eps) / FMAX per row, stored), then the float8 codes
    (WRITE_CODES) and / or the fake-quantized rows in y's dtype (WRITE_Y)."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    if SCALE_GIVEN:
        scale = tl.load(scale_ptr + tl.zeros((BLOCK_M,), dtype=tl.int64))
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        has_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k = tl.arange(0, BLOCK_K).to(tl.int64) + k0 * BLOCK_K
            ok = m_ok[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk, mask=ok, other=0)
            a = tl.abs(to_fp32(x))
            amax = tl.maximum(amax, tl.max(a, axis=1))
            # torch's amax propagates NaN; GPU max reductions drop it.
            has_nan = tl.maximum(has_nan, tl.max((a != a).to(tl.int32), axis=1))
        amax = tl.where(has_nan > 0, NAN, amax)
        if AMAX_ONLY:
            tl.store(scale_ptr + rm, amax, mask=m_ok)
            return
        amax = tl.maximum(amax, eps, propagate_nan=tl.PropagateNan.ALL)
        # A true division, as torch's; "/" may be approximate on a GPU.
        scale = tl.math.div_rn(amax, tl.zeros((BLOCK_M,), dtype=tl.float32) + FMAX)
        tl.store(scale_ptr + rm, scale, mask=m_ok)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k = tl.arange(0, BLOCK_K).to(tl.int64) + k0 * BLOCK_K
        ok = m_ok[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk, mask=ok, other=0)
        q = round_to_float8(
            tl.math.div_rn(to_fp32(x), scale[:, None] + tl.zeros_like(to_fp32(x))),
            FMAX,
            MBITS,
            EMIN,
        )
        if WRITE_CODES:
            c_ptrs = codes_ptr + rm[:, None] * stride_cm + k[None, :] * stride_ck
            c = q.to(codes_ptr.dtype.element_ty)
            if INTERPRETED:  # its float8 cast turns NaN into a number: store NaN's bits
                nan8 = tl.full(q.shape, 0x7F, tl.uint8).to(codes_ptr.dtype.element_ty, bitcast=True)
                c = tl.where(q != q, nan8, c)
            tl.store(c_ptrs, c, mask=ok)
        if WRITE_Y:
            y = cast_rne(q * scale[:, None], y_ptr.dtype.element_ty)
            tl.store(y_ptr + rm[:, None] * stride_ym + k[None, :] * stride_yk, y, mask=ok)


# The K chunk, and elements per program (rows by chunk). Compiled: 4 rows per program (more
# rows of short K spill registers: 256x16 does on sm_90). Interpreted, where a program's
# operations run once over numpy arrays and the cost is the number of programs and chunks:
# short rows take more rows per program (a test shrinks the tile to cover several programs
# and chunks).
_MIN_BLOCK_M = 4
_MAX_BLOCK_M = 8192 if INTERPRETED_KERNELS else _MIN_BLOCK_M
_MAX_BLOCK_K = 1024
_TILE = 8192 if INTERPRETED_KERNELS else 4096


def _tile(m: int, k: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of float8_rows_kernel for x (m, k)."""
    block_k = min(_MAX_BLOCK_K, _TILE // _MIN_BLOCK_M, triton.next_power_of_2(max(k, 16)))
    rows = min(triton.next_power_of_2(m), _TILE // block_k, _MAX_BLOCK_M)
    return max(_MIN_BLOCK_M, rows), block_k


def _launch(x2d: Tensor, fmt: Float8Format, scale: Tensor, codes, y, eps: float, **flags) -> None:
    m, k = x2d.shape
    if m == 0:
        return
    dummy = scale  # never written when its flag is off
    codes_t = dummy if codes is None else codes
    y_t = dummy if y is None else y
    block_m, block_k = _tile(m, k)
    float8_rows_kernel[(triton.cdiv(m, block_m),)](
        x2d,
        scale,
        codes_t,
        y_t,
        m,
        k,
        x2d.stride(0),
        x2d.stride(1),
        codes_t.stride(0) if codes is not None else 0,
        codes_t.stride(1) if codes is not None else 0,
        y_t.stride(0) if y is not None else 0,
        y_t.stride(1) if y is not None else 0,
        float(eps),
        FMAX=fmt.fmax,
        MBITS=fmt.mbits,
        EMIN=fmt.emin,
        WRITE_CODES=codes is not None,
        WRITE_Y=y is not None,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        enable_fp_fusion=False,
        **flags,
    )


def float8_scale(x2d: Tensor, fmt: Float8Format, per_row: bool, eps: float) -> Tensor:
    """The fp32 scale of x2d (M, K): (M,) per row, or (1,) per tensor (the amax of the rows'
    amaxes: torch's amax propagates NaN as the rows' do), as choose_scale_float8_ref."""
    m = x2d.shape[0]
    rows = torch.empty(m, dtype=torch.float32, device=x2d.device)
    if not per_row:
        _launch(x2d, fmt, rows, None, None, eps, SCALE_GIVEN=False, AMAX_ONLY=True)
        amax = rows.amax().reshape(1) if m else rows.new_zeros(1)
        fmax = torch.tensor(fmt.fmax, dtype=torch.float32, device=x2d.device)
        return torch.clamp(amax, min=eps) / fmax
    _launch(x2d, fmt, rows, None, None, eps, SCALE_GIVEN=False, AMAX_ONLY=False)
    return rows


def _quantize(x2d: Tensor, fmt: Float8Format, per_row: bool, eps: float, codes, y) -> Tensor:
    """Scales (see float8_scale), then the codes and / or fq(x); returns the scale."""
    if per_row:
        scale = torch.empty(x2d.shape[0], dtype=torch.float32, device=x2d.device)
        _launch(x2d, fmt, scale, codes, y, eps, SCALE_GIVEN=False, AMAX_ONLY=False)
        return scale
    scale = float8_scale(x2d, fmt, False, eps)
    _launch(x2d, fmt, scale, codes, y, eps, SCALE_GIVEN=True, AMAX_ONLY=False)
    return scale


def float8_codes(
    x2d: Tensor, fmt: Float8Format, per_row: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """(codes, scale): x2d's float8 codes (M, K), contiguous, and its fp32 scale, (M,) per row
    or (1,) per tensor; codes.float() * scale is fq(x) before the cast to x's dtype."""
    codes = torch.empty(x2d.shape, dtype=fmt.dtype, device=x2d.device)
    return codes, _quantize(x2d, fmt, per_row, eps, codes, None)


def fake_quantize_float8(x2d: Tensor, fmt: Float8Format, per_row: bool, eps: float) -> Tensor:
    """fq(x2d) in its dtype (fake_quantize_float8_dynamic_ref, bit for bit)."""
    y = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
    _quantize(x2d, fmt, per_row, eps, None, y)
    return y


# --- the FP8 tensor-core GEMM -------------------------------------------------------------


@autotune(rows="M", cols="N", loop="K", operands=("x_ptr", "w_ptr"), configs=int_gemm_configs())
@triton.jit
def fp8_matmul_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    x_scale_ptr,
    w_scale_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = (sum_k cx * cw) * sx * sw + b: float8 codes x (M, K) and w (N, K), tl.dot with fp32
    accumulation, a scale per row of x and one per row of w in the epilogue."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm_in = rm % M  # rows past M / N read inside the matrix; never stored
    rn_in = rn % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k = tl.arange(0, BLOCK_K).to(tl.int64) + k0 * BLOCK_K
        k_ok = (k < K)[None, :]
        cx = tl.load(
            x_ptr + rm_in[:, None] * stride_xm + k[None, :] * stride_xk, mask=k_ok, other=0.0
        )
        cw = tl.load(
            w_ptr + rn_in[:, None] * stride_wn + k[None, :] * stride_wk, mask=k_ok, other=0.0
        )
        acc = tl.dot(cx, tl.trans(cw), acc)
    sx = tl.load(x_scale_ptr + rm, mask=m_ok, other=1.0)
    sw = tl.load(w_scale_ptr + rn, mask=n_ok, other=1.0)
    out = (acc * sx[:, None]) * sw[None, :]
    if HAS_BIAS:
        out += to_fp32(tl.load(b_ptr + rn, mask=n_ok, other=0.0))[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        cast_rne(out, y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def fp8_matmul(
    x_codes: Tensor,
    x_scale: Tensor,
    w_codes: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """y (M, N) in out_dtype from float8 codes x (M, K) and w (N, K) (the same float8 dtype)
    with fp32 scales of shape (M,) or (1,), and (N,) or (1,)."""
    m, k = x_codes.shape
    n = w_codes.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x_codes.device)
    if m == 0 or n == 0:
        return y
    sx = x_scale.expand(m).contiguous()
    sw = w_scale.expand(n).contiguous()
    fp8_matmul_kernel[_grid(m, n)](
        x_codes,
        w_codes,
        y if bias is None else bias.contiguous(),
        y,
        sx,
        sw,
        m,
        n,
        k,
        x_codes.stride(0),
        x_codes.stride(1),
        w_codes.stride(0),
        w_codes.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
    )
    return y


# --- the fused FP8 QAT linear -------------------------------------------------------------


class Float8Spec(NamedTuple):
    """One operand's FP8 fake quant: format, one scale per row (else per tensor), eps."""

    fmt: Float8Format
    per_row: bool
    eps: float


def _operand(t: Tensor, spec: Float8Spec) -> QuantizedInput:
    """t's float8 codes (rows, K) as the fused GEMMs read them (W_CODES / X_CODES), with a
    scale per row (a per-tensor scale repeated) and zero zero points: (c - 0) * scale is the
    fake quant's q * scale."""
    codes, scale = float8_codes(t, spec.fmt, spec.per_row, spec.eps)
    rows = t.shape[0]
    scale = scale.expand(rows).contiguous()
    return QuantizedInput(codes, scale, torch.zeros_like(scale, dtype=torch.int32))


def _linear_quant(w: QuantizedInput | None, x: QuantizedInput | None, like: Tensor) -> LinearQuant:
    """The fused GEMMs' qparams for float8 codes: per-row scales, zero zero points; integer
    ranges and 1 / scale are never read (codes, no straight-through mask). w None: dW, which
    reads no weight qparams."""
    if w is None:
        one = like.new_ones(1, dtype=torch.float32)
        w_args = (one, one, one.to(torch.int32), 0, 0, 0)
    else:
        w_args = (w.scale, w.scale, w.zero_point, 0, 0, 0)
    if x is None:
        return LinearQuant(*w_args)
    return LinearQuant(*w_args, x.scale, x.scale, x.zero_point, 0, 0, True)


def fp8_forward_applies(device: torch.device, x_spec: Float8Spec | None) -> bool:
    """Whether the forward runs as one FP8 tensor-core GEMM (fp8_matmul): both operands in
    FP8 of the same format, a GPU with FP8 tensor cores (compute capability 8.9 and up), or
    the interpreter (tests). TRITON_QAT_FP8_FORWARD=0 keeps the float GEMM on fq tiles."""
    if x_spec is None or os.environ.get("TRITON_QAT_FP8_FORWARD", "1").strip() == "0":
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return INTERPRETED_KERNELS


def fp8_linear_forward(
    x2d: Tensor,
    w: Tensor,
    bias: Tensor | None,
    w_spec: Float8Spec,
    x_spec: Float8Spec | None,
    tensor_cores: bool | None = None,
    w_codes: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """F.linear(fq(x2d), fq(w).to(x2d.dtype), bias) in x2d's dtype. On FP8 tensor cores
    (fp8_forward_applies, or tensor_cores=True) the products of the codes accumulate exactly
    in fp32 and the scales multiply the sum, so the result differs from the composition only
    in rounding (the composition rounds fq(x) and fq(w) to a half input dtype first); else the
    float GEMM reads the codes: fq tiles bit for bit. w_codes: w's (codes, fp32 scale) as
    stored (a converted layer; w then gives only the shape), the codes this pass would write."""
    if w_codes is None:
        wq = _operand(w, w_spec)
    else:
        codes, scale = w_codes
        scale = scale.reshape(-1).expand(codes.shape[0]).contiguous()
        wq = QuantizedInput(codes, scale, torch.zeros_like(scale, dtype=torch.int32))
    xq = None if x_spec is None else _operand(x2d, x_spec)
    if tensor_cores is None:
        tensor_cores = fp8_forward_applies(x2d.device, x_spec)
    if tensor_cores and xq is not None and xq.codes.dtype == wq.codes.dtype:
        return fp8_matmul(xq.codes, xq.scale, wq.codes, wq.scale, bias, x2d.dtype)
    return fq_linear_forward(x2d, w, bias, _linear_quant(wq, xq, x2d), wq, xq)


def fp8_linear_backward(
    dy: Tensor,
    x2d: Tensor,
    w: Tensor,
    w_spec: Float8Spec,
    x_spec: Float8Spec | None,
    need_dx: bool,
    need_dw: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dw) = (dy @ fq(w), dy^T @ fq(x)) straight through (no mask), each GEMM reading its
    operand's codes (N * K, M * K bytes), made here and freed after the GEMM; the GEMM with
    the larger codes runs first (int_matmul.fused_backward's memory argument)."""
    dx = dw = None

    def grad_input():
        wq = _operand(w, w_spec)
        return fq_linear_grad_input(dy, x2d, w, _linear_quant(wq, None, dy), wq)

    def grad_weight():
        xq = None if x_spec is None else _operand(x2d, x_spec)
        lq = _linear_quant(None, xq, dy)
        return fq_linear_grad_weight(dy, x2d, w, lq, xq, weight_mask=False)

    x_first = need_dw and x_spec is not None and x2d.shape[0] > w.shape[0]
    if x_first:
        dw = grad_weight()
    if need_dx:
        dx = grad_input()
    if need_dw and not x_first:
        dw = grad_weight()
    return dx, dw
