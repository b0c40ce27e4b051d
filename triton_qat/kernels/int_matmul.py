"""Integer GEMMs for quantized linears: weight-only, W8A8 and int4-group x int8.

    weight_only_linear(x, wt, bias)       y = x @ dequant(wt)^T + b    x float, wt int codes
    quantize_rows(x2d, rq)                 int8 codes of the input rows + row scale / zp / sum
    int8_linear(xq, wt, bias, out_dtype)   y = sx * sw * sum((cx - zx)(cw - zw)) + b, tl.dot on
                                           int8 operands with int32 accumulation
    w8a8_linear(x, w, bias, weight_qparams=..., input_quant=...)
                                           the forward of the QAT linear with 8-bit weights
                                           (per tensor / per output channel) and 8-bit
                                           per-token (or static per-tensor) activations
    fq_linear_int8_forward(x2d, w, b, lq)  the fused op's (triton_qat::fq_linear) forward with
                                           a dynamic per-token 8-bit input: W's codes (per
                                           tensor / channel; per group with a range at most
                                           127 wide, w4a8, with TRITON_QAT_INT8_FORWARD=group),
                                           the per-token qparams the op computed, int8_linear
    fused_weight_codes(w, lq, rows)        W's int8 codes for the fused float GEMMs (W_CODES in
                                           kernels/fq_matmul.py), from CODES_MIN_ROWS rows
    fused_input_codes(x2d, lq, cols)       a fake-quantized x's int8 codes for the fused
                                           forward and dW GEMMs (X_CODES), from
                                           CODES_MIN_ROWS cols
    fused_forward / fused_grad_input / fused_grad_weight / fused_backward
                                           the fused op's forward / dX / dW on the Triton
                                           path, as the op and the autotune command run them

Weights arrive as a checked triton_qat.numerics.qparams.IntWeight: int8 codes (N, K), or uint8 bytes
(N, ceil(K / 2)) holding two 4-bit codes q - quant_min, low nibble first (unpacked in
registers), with an fp32 scale and int32 zero point per tensor, per output channel or per
group of `group_size` along K.

Weight-only: per tensor / per channel the K loop sums x * (q - zp), exact small integers in
the input dtype, and the scale multiplies the fp32 sum in the epilogue; per group each tile is
dequantized in registers, ((q - zp) * scale) in fp32 cast to the input dtype, exactly as
QuantizedLinear.dequantized_weight, before tl.dot. Both forms agree with dequantize-then-matmul
within the matmul's rounding (for fp16 / bf16 the epilogue form skips the weight's rounding to
the input dtype; tests/test_int_matmul.py bounds both against float64).

Integer paths: input rows are quantized by quantize_rows with the numerics of
triton_qat.quantizers.fake_quantize_per_token (same codes, scales and zero points); a
float weight's codes come from one pass of kernels.fake_quant.quantized_codes (the fake
quant's own codes, per tensor, per channel or per group). Codes outside int8 (e.g. 0..255)
are stored shifted by `shift` (code - shift fits int8). With per-tensor / per-channel
weights the int32 sum S = sum cx * cw gets the zero-point corrections in the epilogue,
D = S - zx * sum_k cw - zw * sum_k cx + K * zx * zw (exact in int32 while |D| < 2**31,
wrap-around in between does no harm), then y = (D * sx) * sw + b in fp32. Per group, each
group's int32 sum over cx * (cw - zw) (a code difference that fits int8 for ranges up to 127
wide) is corrected by zx * sum(cw - zw), scaled by the group's scale into an fp32
accumulator inside the K loop, and multiplied by sx in the epilogue. The result is the
fake-quant float path's F.linear(fq(x), fq(w)) up to the rounding of these final float steps.

w8a8_linear interface (for the fused QAT forward): x (..., K) float, w (N, K) float weights,
bias (N,) or None, weight_qparams per tensor or per channel along axis 0 with an integer zero
point and a range within int8, input_quant a RowQuant (triton_qat.numerics.qparams.row_quant for
per-token, static_row_quant for per tensor). Returns y (..., N) in x's dtype. No autograd.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_qat.kernels.configs import autotune, int_gemm_configs
from triton_qat.kernels.fake_quant import clamp_codes, quantize_unclamped, quantized_codes
from triton_qat.kernels.fq_matmul import (
    QuantizedInput,
    _grid,
    _grouped_pid,
    _weight_params,
    fq_linear_forward,
    fq_linear_grad_input,
    fq_linear_grad_weight,
    input_precision,
)
from triton_qat.kernels.per_token import per_token_qparams
from triton_qat.kernels.rounding import cast_rne, dot_operand, to_fp32
from triton_qat.numerics.qparams import (
    INT8_RANGE,
    PER_GROUP,
    IntWeight,
    LinearQuant,
    NormQParams,
    PerTokenQParams,
    QParams,
    RowQuant,
    int_weight,
    normalize,
)
from triton_qat.numerics.reference import reciprocal

# The largest |D| an int32 accumulator holds.
_INT32_LIMIT = 2**31 - 1


def _int_gemm_autotune(param_bytes: int = 0, extra_key=("W_GRAN",)):
    """The autotuner of an integer GEMM over (M, N, K) with operands x_ptr and w_ptr."""
    return autotune(
        rows="M",
        cols="N",
        loop="K",
        operands=("x_ptr", "w_ptr"),
        extra_key=extra_key,
        configs=int_gemm_configs(),
        param_bytes=param_bytes,
    )


@triton.jit
def _output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows rm and cols rn (int64) of this program's output tile, and their in-range masks."""
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N


@triton.jit
def _load_tile(ptr, r, c, r_ok, c_ok, stride_r, stride_c):
    """The (len(r), len(c)) tile at rows r, cols c; 0 outside the matrix."""
    ok = r_ok[:, None] & c_ok[None, :]
    return tl.load(ptr + r[:, None] * stride_r + c[None, :] * stride_c, mask=ok, other=0)


@triton.jit
def _load_codes(w_ptr, rn, k, n_ok, k_ok, stride_wn, stride_wk, qmin, PACKED: tl.constexpr):
    """int32 weight codes q of rows rn (BN,) and cols k (BK,); 0 outside the matrix."""
    ok = n_ok[:, None] & k_ok[None, :]
    if PACKED:
        byte = tl.load(w_ptr + rn[:, None] * stride_wn + (k // 2)[None, :] * stride_wk, mask=ok)
        nibble = (byte.to(tl.int32) >> ((k & 1) * 4).to(tl.int32)[None, :]) & 0xF
        q = tl.where(ok, nibble + qmin, 0)
    else:
        q = _load_tile(w_ptr, rn, k, n_ok, k_ok, stride_wn, stride_wk).to(tl.int32)
    return q


@triton.jit
def quantize_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    zp_ptr,
    sum_ptr,
    static_scale_ptr,
    static_zp_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    param_stride,
    qmin,
    qmax,
    shift,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Codes q - shift (int8) and code sum (int32) of each row, with the row's given scale and
    zero point: one for every row (param_stride 0) or one per row (param_stride 1). Dynamic
    per-token qparams come from kernels.per_token first (one definition of that formula)."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = rm < M
    scale = tl.load(static_scale_ptr + rm * param_stride, mask=m_ok, other=1.0)
    zp = tl.load(static_zp_ptr + rm * param_stride, mask=m_ok, other=0).to(tl.float32)
    tl.store(scale_ptr + rm, scale, mask=m_ok)
    tl.store(zp_ptr + rm, zp.to(tl.int32), mask=m_ok)
    inv = tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)  # fp32 1 / scale, as torch's
    total = tl.zeros((BLOCK_R,), tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k = tl.arange(0, BLOCK_K).to(tl.int64) + k0 * BLOCK_K
        ok = m_ok[:, None] & (k < K)[None, :]
        x = to_fp32(_load_tile(x_ptr, rm, k, m_ok, k < K, stride_xm, stride_xk))
        qf = quantize_unclamped(x, inv[:, None], zp[:, None], False)
        c = tl.where(ok, clamp_codes(qf, qmin, qmax) - shift, 0.0).to(tl.int32)
        tl.store(q_ptr + rm[:, None] * stride_qm + k[None, :], c.to(tl.int8), mask=ok)
        total += tl.sum(c, axis=1)
    tl.store(sum_ptr + rm, total, mask=m_ok)


# Per group the weight-only loop loads a scale and zero point with every weight tile.
@_int_gemm_autotune(param_bytes=8, extra_key=("W_GRAN", "GROUP_SIZE"))
@triton.jit
def int_weight_matmul_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    scale_ptr,
    zp_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    w_qmin,
    W_GRAN: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Weight-only: y = x @ ((q - zp) * scale)^T + b, fp32 accumulation, x's dtype out."""
    rm, rn, m_ok, n_ok = _output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dtype = y_ptr.dtype.element_ty
    if W_GRAN == 0:
        zp = tl.load(zp_ptr)
    elif W_GRAN == 1:
        zp = tl.load(zp_ptr + rn, mask=n_ok, other=0)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k = tl.arange(0, BLOCK_K).to(tl.int64) + k0 * BLOCK_K
        k_ok = k < K
        x = _load_tile(x_ptr, rm, k, m_ok, k_ok, stride_xm, stride_xk)
        q = _load_codes(w_ptr, rn, k, n_ok, k_ok, stride_wn, stride_wk, w_qmin, PACKED)
        if W_GRAN == 2:
            _, scale, zpf = _weight_params(
                scale_ptr,
                scale_ptr,
                zp_ptr,
                rn,
                k,
                n_ok,
                k_ok,
                k0 * BLOCK_K,
                K,
                W_GRAN,
                GROUP_SIZE,
                BLOCK_K,
            )
            w = cast_rne((q.to(tl.float32) - zpf) * scale, dtype)
        else:
            # |q - zp| <= 255: exact in every input dtype; the scale waits for the epilogue.
            w = (q - zp).to(tl.float32).to(dtype)
        acc = tl.dot(dot_operand(x), tl.trans(dot_operand(w)), acc, input_precision=INPUT_PRECISION)
    if W_GRAN == 0:
        acc = acc * tl.load(scale_ptr)
    elif W_GRAN == 1:
        acc = acc * tl.load(scale_ptr + rn, mask=n_ok, other=1.0)[None, :]
    if HAS_BIAS:
        acc += to_fp32(tl.load(b_ptr + rn, mask=n_ok, other=0.0))[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        cast_rne(acc, dtype),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@_int_gemm_autotune()
@triton.jit
def int8_matmul_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    x_scale_ptr,
    x_zp_ptr,
    x_sum_ptr,
    w_scale_ptr,
    w_zp_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    x_shift,
    w_qmin,
    W_GRAN: tl.constexpr,
    PACKED: tl.constexpr,
    X_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = sx * sw * sum_k (cx - zx)(cw - zw) + b from int8 codes: tl.dot with int32
    accumulation; X_ZP False when every row's effective zero point zx - x_shift is 0."""
    rm, rn, m_ok, n_ok = _output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_zp = tl.load(x_zp_ptr + rm, mask=m_ok, other=0) - x_shift
    x_scale = tl.load(x_scale_ptr + rm, mask=m_ok, other=1.0)
    if W_GRAN == 2:
        accf = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        n_groups = K // group_size
        for gi in range(0, n_groups):
            gidx = rn * n_groups + gi
            w_zp = tl.load(w_zp_ptr + gidx, mask=n_ok, other=0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
            for c0 in range(0, tl.cdiv(group_size, GROUP_CHUNK)):
                kg = tl.arange(0, GROUP_CHUNK) + c0 * GROUP_CHUNK
                k_ok = kg < group_size
                k = kg.to(tl.int64) + gi * group_size
                cx = _load_tile(x_ptr, rm, k, m_ok, k_ok, stride_xm, stride_xk)
                q = _load_codes(w_ptr, rn, k, n_ok, k_ok, stride_wn, stride_wk, w_qmin, PACKED)
                # cw - zw lies within +-(quant_max - quant_min) <= 127: an int8 operand.
                wd = tl.where(k_ok[None, :], q - w_zp[:, None], 0)
                acc = tl.dot(cx, tl.trans(wd.to(tl.int8)), acc, out_dtype=tl.int32)
                if X_ZP:
                    w_sum += tl.sum(wd, axis=1)
            if X_ZP:
                acc -= x_zp[:, None] * w_sum[None, :]
            w_scale = tl.load(w_scale_ptr + gidx, mask=n_ok, other=1.0)
            accf += acc.to(tl.float32) * w_scale[None, :]
        out = accf * x_scale[:, None]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            k = tl.arange(0, BLOCK_K).to(tl.int64) + k0 * BLOCK_K
            k_ok = k < K
            cx = _load_tile(x_ptr, rm, k, m_ok, k_ok, stride_xm, stride_xk)
            q = _load_codes(w_ptr, rn, k, n_ok, k_ok, stride_wn, stride_wk, w_qmin, PACKED)
            acc = tl.dot(cx, tl.trans(q.to(tl.int8)), acc, out_dtype=tl.int32)
            if X_ZP:
                w_sum += tl.sum(q, axis=1)
        if W_GRAN == 0:
            w_zp = tl.load(w_zp_ptr) + tl.zeros((BLOCK_N,), tl.int32)
            w_scale = tl.load(w_scale_ptr) + tl.zeros((BLOCK_N,), tl.float32)
        else:
            w_zp = tl.load(w_zp_ptr + rn, mask=n_ok, other=0)
            w_scale = tl.load(w_scale_ptr + rn, mask=n_ok, other=1.0)
        # sum (cx - zx)(cw - zw) = S - zw * sum cx - zx * sum cw + K * zx * zw, in int32.
        x_sum = tl.load(x_sum_ptr + rm, mask=m_ok, other=0)
        acc -= w_zp[None, :] * x_sum[:, None]
        if X_ZP:
            acc -= x_zp[:, None] * w_sum[None, :]
            acc += (K * x_zp)[:, None] * w_zp[None, :]
        out = (acc.to(tl.float32) * x_scale[:, None]) * w_scale[None, :]
    if HAS_BIAS:
        out += to_fp32(tl.load(b_ptr + rn, mask=n_ok, other=0.0))[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        cast_rne(out, y_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


# Rows per program and the K chunk of quantize_rows; the interpreter prefers fewer, larger steps.
_ROWS_PER_PROGRAM = 4
_MAX_ROW_CHUNK = 1024


class QuantizedRows(NamedTuple):
    """A GEMM input as int8 codes (M, K), stored as code - shift, with per-row scale (fp32),
    zero point (int32, unshifted) and sum of the stored codes (int32)."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    code_sum: Tensor
    shift: int
    may_have_zero_point: bool  # False: every row's zero point equals shift


def code_shift(quant_min: int, quant_max: int) -> int:
    """What to subtract from codes in [quant_min, quant_max] (at most 256 values) to fit int8."""
    if INT8_RANGE[0] <= quant_min and quant_max <= INT8_RANGE[1]:
        return 0
    return quant_min - INT8_RANGE[0]


def quantize_rows(x2d: Tensor, rq: RowQuant) -> QuantizedRows:
    """Quantize each row of x2d (M, K) with `rq`: the codes, scales and zero points of
    fake_quantize_per_token (dynamic) or of the static per-tensor fake quant."""
    m, k = x2d.shape
    dev = x2d.device
    codes = torch.empty((m, k), dtype=torch.int8, device=dev)
    scale = torch.empty(m, dtype=torch.float32, device=dev)
    zp = torch.empty(m, dtype=torch.int32, device=dev)
    total = torch.empty(m, dtype=torch.int32, device=dev)
    shift = code_shift(rq.quant_min, rq.quant_max)
    if m:
        block_k = min(triton.next_power_of_2(max(k, 1)), _MAX_ROW_CHUNK)
        if rq.dynamic:
            spec = PerTokenQParams(
                rq.quant_min, rq.quant_max, rq.symmetric, rq.symmetric_zero_point, rq.eps
            )
            static_scale, _, static_zp = per_token_qparams(x2d, spec)
            per_row = True
        else:
            static_scale, static_zp = rq.scale, rq.zero_point
            per_row = rq.scale.numel() != 1
        quantize_rows_kernel[(triton.cdiv(m, _ROWS_PER_PROGRAM),)](
            x2d,
            codes,
            scale,
            zp,
            total,
            static_scale,
            static_zp,
            m,
            k,
            x2d.stride(0),
            x2d.stride(1),
            codes.stride(0),
            1 if per_row else 0,
            float(rq.quant_min),
            float(rq.quant_max),
            float(shift),
            BLOCK_R=_ROWS_PER_PROGRAM,
            BLOCK_K=block_k,
            num_warps=4,
            # x * inv + 1.5 * 2**23 must not become one FMA: it would round the exact product.
            enable_fp_fusion=False,
        )
    zero_zp = rq.dynamic and rq.symmetric and rq.symmetric_zero_point == shift
    return QuantizedRows(codes, scale, zp, total, shift, not zero_zp)


def _flatten(x: Tensor, k: int) -> Tensor:
    return x.reshape(math.prod(x.shape[:-1]), k)


def weight_only_linear(x: Tensor, wt: IntWeight, bias: Tensor | None) -> Tensor:
    """x (..., K) fp32 / fp16 / bf16 times the dequantized integer weight, plus bias; x's dtype."""
    k, n = wt.in_features, wt.out_features
    x2d = _flatten(x, k)
    m = x2d.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n:
        if k == 0:
            y.zero_()
            if bias is not None:
                y += bias.to(x.dtype)
        else:
            int_weight_matmul_kernel[_grid(m, n)](
                x2d,
                wt.codes,
                y if bias is None else bias.contiguous(),
                y,
                wt.scale,
                wt.zero_point,
                m,
                n,
                k,
                x2d.stride(0),
                x2d.stride(1),
                wt.codes.stride(0),
                wt.codes.stride(1),
                y.stride(0),
                y.stride(1),
                wt.quant_min,
                W_GRAN=wt.gran,
                GROUP_SIZE=max(wt.group_size, 1),
                PACKED=wt.packed,
                HAS_BIAS=bias is not None,
                INPUT_PRECISION=input_precision(x.dtype),
                enable_fp_fusion=False,
            )
    return y.reshape(*x.shape[:-1], n)


def _int32_reach(w_span: int, sum_len: int, x_span: int) -> int:
    """A bound on |sum (cx - zx)(cw - zw)| over one int32 sum of `sum_len` products (all of K,
    or one group), with |cx - zx| <= x_span and |cw - zw| <= w_span."""
    return sum_len * x_span * max(w_span, 1)


def _int8_gemm_takes(w_span: int, sum_len: int, x_span: int, per_group: bool) -> bool:
    """int8_matmul_kernel's rule: per group, cw - zw is an int8 operand (weight codes at most
    127 wide); every int32 sum is exact."""
    if per_group and w_span > 127:
        return False
    return _int32_reach(w_span, sum_len, x_span) <= _INT32_LIMIT


def int8_linear_supports(wt: IntWeight, rq: RowQuant) -> bool:
    """Whether int8_linear takes these weights with inputs quantized by `rq`."""
    w_span, sum_len = wt.quant_max - wt.quant_min, wt.group_size or wt.in_features
    return _int8_gemm_takes(w_span, sum_len, rq.quant_max - rq.quant_min, wt.gran == PER_GROUP)


def int8_linear(
    xq: QuantizedRows, wt: IntWeight, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """y (M, N) = sx * sw * sum_k (cx - zx)(cw - zw) + b in out_dtype, from quantize_rows'
    output and integer weights (per tensor, per channel, or per group with a range at most
    127 wide, e.g. int4)."""
    m, k = xq.codes.shape
    n = wt.out_features
    if wt.gran == PER_GROUP and wt.quant_max - wt.quant_min > 127:
        raise ValueError(
            "per-group integer GEMM needs weight codes at most 127 wide (e.g. int4), got "
            f"[{wt.quant_min}, {wt.quant_max}]"
        )
    if k != wt.in_features:
        raise ValueError(f"input codes have {k} columns, the weight in_features={wt.in_features}")
    # |cx - zx| <= 255, or 128 when every zero point is 0.
    x_span = 255 if xq.may_have_zero_point else 128
    if _int32_reach(wt.quant_max - wt.quant_min, wt.group_size or k, x_span) > _INT32_LIMIT:
        raise ValueError(
            f"in_features={k} is too large for an int32 accumulator of these 8-bit products"
        )
    dev = xq.codes.device
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    if not (m and n):
        return y
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(out_dtype)
        return y
    g = max(wt.group_size, 1)
    int8_matmul_kernel[_grid(m, n)](
        xq.codes,
        wt.codes,
        y if bias is None else bias.contiguous(),
        y,
        xq.scale,
        xq.zero_point,
        xq.code_sum,
        wt.scale,
        wt.zero_point,
        m,
        n,
        k,
        g,
        xq.codes.stride(0),
        xq.codes.stride(1),
        wt.codes.stride(0),
        wt.codes.stride(1),
        y.stride(0),
        y.stride(1),
        xq.shift,
        wt.quant_min,
        W_GRAN=wt.gran,
        PACKED=wt.packed,
        X_ZP=xq.may_have_zero_point,
        HAS_BIAS=bias is not None,
        # K chunk within a group: a power of two >= 32 (int8 tl.dot), masked at the group end.
        GROUP_CHUNK=max(32, min(triton.next_power_of_2(g), 128)),
        enable_fp_fusion=False,
    )
    return y


def w8a8_linear(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    *,
    weight_qparams: QParams,
    input_quant: RowQuant,
) -> Tensor:
    """F.linear(fq_rows(x), fq(w), bias) through int8 codes: both operands quantized by
    quantize_rows, one int8 GEMM. x (..., K), w (N, K) float; y (..., N) in x's dtype."""
    n, k = w.shape
    nq = normalize(w, weight_qparams)
    if nq.granularity == "per_group" or nq.float_zero_point:
        raise ValueError("w8a8_linear takes per-tensor or per-channel (axis 0) integer qparams")
    if nq.granularity == "per_channel" and weight_qparams.axis not in (0, -2):
        raise ValueError(f"weight_qparams per channel must use axis 0, got {weight_qparams.axis}")
    wt = _weight_codes(w, nq, reciprocal(nq.scale))
    x2d = _flatten(x, k)
    y = int8_linear(quantize_rows(x2d, input_quant), wt, bias, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def _weight_codes(w: Tensor, nq: NormQParams, inv_scale: Tensor) -> IntWeight:
    """The integer weight of a float weight w (N, K) with integer-zero-point qparams nq per
    tensor, per output channel or per group along K (its NormQParams, inv_scale = 1 / scale):
    the fake quant's codes clamp(q), one pass over w, shifted into int8 where the range
    needs it (at most 256 codes)."""
    qmin, qmax = nq.quant_min, nq.quant_max
    shift = code_shift(qmin, qmax)
    codes = quantized_codes(w, nq, inv_scale, shift)
    group_size = nq.cols if nq.granularity == "per_group" else None
    zp = nq.zero_point - shift
    return int_weight(codes, nq.scale, zp, qmin - shift, qmax - shift, w.shape[1], group_size)


def int8_forward_applies(weight: Tensor, lq: LinearQuant) -> bool:
    """Whether the fused linear's forward runs as one int8 GEMM (fq_linear_int8_forward): a
    dynamic per-token 8-bit input (at most 256 codes) and weights with integer zero points,
    per tensor / per channel with at most 256 codes (w8a8) or per group with a range at most
    127 wide (e.g. int4: w4a8; int8_linear_supports' rule); K (or the group) small enough for
    exact int32 sums. The backward stays on the float kernels.

    TRITON_QAT_INT8_FORWARD=0 keeps every forward float; per-group weights take the integer
    forward only with TRITON_QAT_INT8_FORWARD=group: each group's int32 sum must be rescaled
    into the fp32 accumulator, ~2 instructions per accumulator element per group, which for
    groups of 32 makes the loop issue-bound far beyond its int8 MMAs (compiled for sm_90:
    ~390 instructions per 128x64x32 int8 MMA against ~280 per 128x128x64 bf16 MMA of the
    float GEMM reading W's codes; bench/README.md)."""
    mode = os.environ.get("TRITON_QAT_INT8_FORWARD", "1").strip()
    if mode == "0" or not lq.x_per_row or lq.w_zp.is_floating_point():
        return False
    if lq.group_size and mode != "group":
        return False
    w_span, x_span = lq.w_qmax - lq.w_qmin, lq.x_qmax - lq.x_qmin
    if w_span > 255 or x_span > 255:
        return False
    # |cx - zx| <= 255: a per-token zero point may lie anywhere in the input's range.
    sum_len = lq.group_size or weight.shape[1]
    return _int8_gemm_takes(w_span, sum_len, 255, lq.group_size > 0)


def fq_linear_int8_forward(
    x2d: Tensor, weight: Tensor, bias: Tensor | None, lq: LinearQuant
) -> Tensor:
    """The fused linear's forward F.linear(fq_rows(x), fq(w), b) as an int8 GEMM, with the
    per-token qparams the caller computed (lq.x_scale / lq.x_zp, one per row) and W's codes
    from one pass over W (per tensor, per channel or per group): the codes are those of the
    float path, the integer sums exact (per group: each group's), and the result differs
    from the float path only in the rounding of its final scaling (per group: the fp32 sum
    of the scaled group sums) and, for half inputs, in not rounding fq(x) and fq(w) to the
    input dtype. x2d (M, K); y (M, N) in x2d's dtype."""
    wt = _weight_codes(weight, lq.weight_norm(weight), lq.w_inv)
    return int8_linear(_input_codes(x2d, lq), wt, bias, x2d.dtype)


def _input_codes(x2d: Tensor, lq: LinearQuant) -> QuantizedRows:
    """x's int8 codes with the fused op's input qparams (per tensor, or the per-token ones it
    computed): the fake quant's own codes."""
    return quantize_rows(x2d, RowQuant(lq.x_qmin, lq.x_qmax, scale=lq.x_scale, zero_point=lq.x_zp))


# The fused GEMMs read an operand's int8 codes (fused_weight_codes, fused_input_codes) where
# the other operand's extent reaches this: below it, each tile of the operand is
# fake-quantized in the GEMM only a few times (once per BLOCK_M rows of x, BLOCK_N rows of W).
CODES_MIN_ROWS = 256


def _codes_wanted(extent: int) -> bool:
    """Whether to read an operand as codes where the other's extent is `extent`:
    TRITON_QAT_CODES=0 never, =1 always (where the quantizer allows), else from
    CODES_MIN_ROWS."""
    mode = os.environ.get("TRITON_QAT_CODES", "").strip()
    return mode == "1" or (mode != "0" and extent >= CODES_MIN_ROWS)


def fused_weight_codes(weight: Tensor, lq: LinearQuant, rows: int) -> IntWeight | None:
    """W's int8 codes for the fused forward / dX GEMMs (kernels/fq_matmul.py, W_CODES), or
    None where they fake-quantize W tiles themselves. Per tensor, per channel or per group.

    One pass writes q - shift per element (N * K bytes, freed after the GEMM); the GEMM then
    computes (q - zp) * scale per element, the fake quant's last two steps, bit for bit: the
    multiply, rounding and clamp are done once per element instead of once per BLOCK_M rows of
    x (compiled for sm_90, the in-GEMM fake quant is ~4x the hot loop's instructions of a
    plain GEMM; see bench/README.md). Taken for integer zero points and at most 256 codes per
    tensor, channel or group, from CODES_MIN_ROWS rows; TRITON_QAT_CODES=0 never takes it,
    =1 at any row count (tests, benchmarks)."""
    if not _codes_wanted(rows) or lq.w_zp.is_floating_point() or lq.w_qmax - lq.w_qmin > 255:
        return None
    return _weight_codes(weight, lq.weight_norm(weight), lq.w_inv)


def fused_input_codes(x2d: Tensor, lq: LinearQuant, cols: int) -> QuantizedInput | None:
    """x's int8 codes for the fused forward and dW GEMMs (X_CODES) when x is fake-quantized
    (per tensor, or per token with the qparams the op computed): the same trade as
    fused_weight_codes, x's tiles being fake-quantized once per BLOCK_N of the `cols` output
    features (forward) or weight rows (dW) otherwise. M * K bytes, freed after the GEMM (see
    fused_backward for the backward's memory). None where the GEMM quantizes x itself."""
    if not _codes_wanted(cols) or not lq.x_fq or lq.x_qmax - lq.x_qmin > 255:
        return None
    rows = _input_codes(x2d, lq)
    return QuantizedInput(rows.codes, rows.scale, rows.zero_point - rows.shift)


def fused_forward(x2d: Tensor, weight: Tensor, bias: Tensor | None, lq: LinearQuant) -> Tensor:
    """The fused op's forward on the Triton path: the int8 GEMM where int8_forward_applies,
    else the float GEMM, on the operands' codes where fused_*_codes take them."""
    if int8_forward_applies(weight, lq):
        return fq_linear_int8_forward(x2d, weight, bias, lq)
    codes = fused_weight_codes(weight, lq, x2d.shape[0])
    x_codes = fused_input_codes(x2d, lq, weight.shape[0])
    return fq_linear_forward(x2d, weight, bias, lq, codes, x_codes)


def fused_grad_input(dy: Tensor, x2d: Tensor, weight: Tensor, lq: LinearQuant) -> Tensor:
    """The fused op's dX on the Triton path, on W's codes where fused_weight_codes takes them
    (freed on return)."""
    codes = fused_weight_codes(weight, lq, dy.shape[0])
    return fq_linear_grad_input(dy, x2d, weight, lq, codes)


def fused_grad_weight(dy: Tensor, x2d: Tensor, weight: Tensor, lq: LinearQuant) -> Tensor:
    """The fused op's dW on the Triton path, on a fake-quantized x's codes where
    fused_input_codes takes them (freed on return)."""
    x_codes = fused_input_codes(x2d, lq, weight.shape[0])
    return fq_linear_grad_weight(dy, x2d, weight, lq, x_codes)


def fused_backward(
    dy: Tensor, x2d: Tensor, weight: Tensor, lq: LinearQuant, need_dx: bool, need_dw: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dw) of the fused op on the Triton path (None where not needed).

    Memory: a float linear's backward holds dx and dw at its end. W's codes (N * K bytes,
    for dX) and a fake-quantized x's codes (M * K bytes, for dW) each live only through
    their GEMM, and an int8 code takes at most half a gradient element's bytes. Run first,
    a GEMM's codes sit beside the other gradient's absence, so they stay under the float
    peak; the second GEMM's codes sit beside both gradients' buffers (one being written).
    So the GEMM with the larger codes runs first: the backward's peak exceeds the float one by
    at most min(M, N) * K bytes, and only when both operands are read as codes (a
    fake-quantized x from CODES_MIN_ROWS weight rows, i.e. per-token or static x)."""
    x_first = need_dw and lq.x_fq and x2d.shape[0] > weight.shape[0]
    dx = dw = None
    if x_first:
        dw = fused_grad_weight(dy, x2d, weight, lq)
    if need_dx:
        dx = fused_grad_input(dy, x2d, weight, lq)
    if need_dw and not x_first:
        dw = fused_grad_weight(dy, x2d, weight, lq)
    return dx, dw
