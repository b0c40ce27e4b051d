"""Fused fake-quant linear: forward, dX and dW GEMMs that fake-quantize operand tiles in
registers as they are loaded. No fake-quantized copy or mask is ever written to memory; an
operand may arrive as its int8 codes instead (W_CODES / X_CODES, written by one pass in
int_matmul), whose (q - zp) * scale is the same fake-quantized tile.

    forward: y  = fq_x(x) @ fq_w(w)^T + b          x (M, K), w (N, K), y (M, N)
    dX:      dx = (dy @ fq_w(w)) * mask_x(x)        dy (M, N)
    dW:      dw = (dy^T @ fq_x(x)) * mask_w(w)

Weight qparams: W_GRAN 0 per tensor, 1 per output channel (row of w), 2 per group of
GROUP_SIZE along K (a constexpr: the common sizes load a qparam per tile row or per group,
not per element). Input qparams (X_FQ): per tensor, or per row of x (X_PER_ROW: dynamic
per token, vectors of M from kernels/per_token.py); or none. Fake-quantized tiles are cast to
the input dtype before tl.dot; products accumulate in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_qat.kernels.configs import autotune
from triton_qat.kernels.fake_quant import fake_quant_values, quantize_unclamped
from triton_qat.kernels.rounding import cast_rne, dot_operand, to_fp32
from triton_qat.numerics.qparams import IntWeight, LinearQuant

# Granularity flags that select a different kernel variant: part of the autotune key (the
# group size is a constexpr: it decides how a tile's qparams are loaded, see _weight_params).
# Per group, the forward and dX loops load 1 / scale, scale and zero point (4 bytes each) with
# every weight tile (configs.gathered_param_bytes); dW reads them in the epilogue only.
_GRAN_KEY = ("W_GRAN", "GROUP_SIZE", "X_FQ", "X_PER_ROW")
_GROUP_PARAM_BYTES = 12


@triton.jit
def _grouped_pid(
    pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr
):
    """Program id -> (tile row, tile col), GROUP_M tile rows at a time for L2 reuse."""
    num_pid_m = tl.cdiv(n_rows, BLOCK_M)
    num_pid_n = tl.cdiv(n_cols, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _spread_groups(p, GROUP_SIZE: tl.constexpr):
    """(R, G) qparams, one per row and group -> (R, G * GROUP_SIZE), one per element."""
    rows: tl.constexpr = p.shape[0]
    groups: tl.constexpr = p.shape[1]
    wide = tl.broadcast_to(p[:, :, None], (rows, groups, GROUP_SIZE))
    return tl.reshape(wide, (rows, groups * GROUP_SIZE))


@triton.jit
def _weight_params(
    inv_ptr,
    scale_ptr,
    zp_ptr,
    rn,
    k,
    n_ok,
    k_ok,
    k_start,
    K,
    W_GRAN: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    COLS: tl.constexpr,
):
    """(inv, scale, zp) of the weight tile at rows rn (BN,) and the COLS cols k = k_start +
    arange(COLS), broadcastable to (BN, COLS).

    Per group, a tile within one group (GROUP_SIZE a multiple of COLS) loads one qparam per
    row, a tile of whole groups (COLS a multiple of GROUP_SIZE) one per row and group, spread
    over the group in registers; only other group sizes (e.g. 48 with COLS 32) gather one
    qparam per element."""
    if W_GRAN == 0:
        inv = tl.load(inv_ptr)
        scale = tl.load(scale_ptr)
        zp = tl.load(zp_ptr).to(tl.float32)
    elif W_GRAN == 1:
        inv = tl.load(inv_ptr + rn, mask=n_ok, other=1.0)[:, None]
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=1.0)[:, None]
        zp = tl.load(zp_ptr + rn, mask=n_ok, other=0).to(tl.float32)[:, None]
    else:
        n_groups = K // GROUP_SIZE
        if GROUP_SIZE % COLS == 0:
            idx = rn * n_groups + k_start // GROUP_SIZE
            inv = tl.load(inv_ptr + idx, mask=n_ok, other=1.0)[:, None]
            scale = tl.load(scale_ptr + idx, mask=n_ok, other=1.0)[:, None]
            zp = tl.load(zp_ptr + idx, mask=n_ok, other=0).to(tl.float32)[:, None]
        elif COLS % GROUP_SIZE == 0:
            g = k_start // GROUP_SIZE + tl.arange(0, COLS // GROUP_SIZE)
            idx = rn[:, None] * n_groups + g[None, :]
            ok = n_ok[:, None] & (g < n_groups)[None, :]
            inv = _spread_groups(tl.load(inv_ptr + idx, mask=ok, other=1.0), GROUP_SIZE)
            scale = _spread_groups(tl.load(scale_ptr + idx, mask=ok, other=1.0), GROUP_SIZE)
            zp = _spread_groups(tl.load(zp_ptr + idx, mask=ok, other=0).to(tl.float32), GROUP_SIZE)
        else:
            idx = rn[:, None] * n_groups + (k // GROUP_SIZE)[None, :]
            ok = n_ok[:, None] & k_ok[None, :]
            inv = tl.load(inv_ptr + idx, mask=ok, other=1.0)
            scale = tl.load(scale_ptr + idx, mask=ok, other=1.0)
            zp = tl.load(zp_ptr + idx, mask=ok, other=0).to(tl.float32)
    return inv, scale, zp


@triton.jit
def _load_operand(ptrs, ok, MASKED: tl.constexpr):
    """A tile of the loop's operands: rows are wrapped into the matrix by the caller, so only
    the loop dimension's last, partial step (MASKED) needs a mask; 0.0 past its end."""
    if MASKED:
        t = tl.load(ptrs, mask=ok, other=0.0)
    else:
        t = tl.load(ptrs)
    return t


@triton.jit
def _load_quantized(ptrs, ok, zp, CODES: tl.constexpr, MASKED: tl.constexpr):
    """A tile of a fake-quantized operand as _load_operand; int8 codes read their zero point
    past the end instead of 0, so that (c - zp) * scale is an exact 0 without a select after
    the fake quant (a float operand's fq(0) is 0 only for an integer zero point within the
    range). Float8 codes (kernels/float8.py) come with a zero point of 0: 0.0 past the end."""
    if CODES and MASKED and ptrs.dtype.element_ty.is_int():
        t = tl.load(ptrs, mask=ok, other=zp.to(tl.int8))
    else:
        t = _load_operand(ptrs, ok, MASKED)
    return t


@triton.jit
def _fake_quant_tile(w, inv, scale, zp, qmin, qmax, FLOAT_ZP: tl.constexpr, CODES: tl.constexpr):
    """fp32 fq(t) of an operand tile: from the float values, or (CODES) from their int8 codes
    c = q - shift, with zp the zero point minus shift: (c - zp) * scale is the fake quant's
    (q - zp) * scale to the bit (integers of at most 9 bits are exact in fp32)."""
    if CODES:
        wq = (w.to(tl.float32) - zp) * scale
    else:
        wq, _ = fake_quant_values(to_fp32(w), inv, scale, zp, qmin, qmax, FLOAT_ZP)
    return wq


@triton.jit
def _weight_tile(
    ptrs,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    rn,
    k,
    n_ok,
    k_ok,
    ok,
    k_start,
    K,
    qmin,
    qmax,
    dtype: tl.constexpr,
    W_GRAN: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    COLS: tl.constexpr,
    FLOAT_ZP: tl.constexpr,
    CODES: tl.constexpr,
    MASKED: tl.constexpr,
):
    """fq(w) in `dtype` of the weight tile at `ptrs` (rows rn, the COLS cols k from k_start;
    see _weight_params), from the float weight or its int8 codes (CODES); `ok` masks the
    loop's partial last step (MASKED), where the tile must be 0."""
    inv, scale, zp = _weight_params(
        inv_ptr, scale_ptr, zp_ptr, rn, k, n_ok, k_ok, k_start, K, W_GRAN, GROUP_SIZE, COLS
    )
    w = _load_quantized(ptrs, ok, zp, CODES, MASKED)
    wq = _fake_quant_tile(w, inv, scale, zp, qmin, qmax, FLOAT_ZP, CODES)
    if MASKED and not CODES:
        wq = tl.where(ok, wq, 0.0)
    return cast_rne(wq, dtype)


@triton.jit
def _input_tile(
    ptrs,
    ok,
    inv,
    scale,
    zp,
    qmin,
    qmax,
    dtype: tl.constexpr,
    X_FQ: tl.constexpr,
    CODES: tl.constexpr,
    MASKED: tl.constexpr,
):
    """The forward's / dW's input tile at `ptrs` in `dtype`: as stored, fake-quantized (X_FQ),
    or from its int8 codes (CODES); 0 where `ok` is False on the loop's partial last step
    (MASKED)."""
    if CODES:
        x = _load_quantized(ptrs, ok, zp, True, MASKED)
        x = cast_rne(_fake_quant_tile(x, inv, scale, zp, qmin, qmax, False, True), dtype)
    else:
        x = _load_operand(ptrs, ok, MASKED)
        if X_FQ:
            xq = _fake_quant_tile(x, inv, scale, zp, qmin, qmax, False, False)
            if MASKED:
                xq = tl.where(ok, xq, 0.0)
            x = cast_rne(xq, dtype)
    return x


@triton.jit
def _input_params(inv_ptr, scale_ptr, zp_ptr, rm, m_ok, X_PER_ROW: tl.constexpr):
    """(inv, scale, zp) of the input rows rm (BM,), broadcastable to a (BM, BK) tile."""
    if X_PER_ROW:
        inv = tl.load(inv_ptr + rm, mask=m_ok, other=1.0)[:, None]
        scale = tl.load(scale_ptr + rm, mask=m_ok, other=1.0)[:, None]
        zp = tl.load(zp_ptr + rm, mask=m_ok, other=0).to(tl.float32)[:, None]
    else:
        inv = tl.load(inv_ptr)
        scale = tl.load(scale_ptr)
        zp = tl.load(zp_ptr).to(tl.float32)
    return inv, scale, zp


@triton.jit
def _group_scales(
    scale_ptr, rows, k, rows_ok, k_ok, k_start, K, GROUP_SIZE: tl.constexpr, COLS: tl.constexpr
):
    """Scales of a tile of per-group float8 codes (X_GROUP_SIZE): one per row and group of
    GROUP_SIZE along K, at rows (R,) and the COLS cols k = k_start + arange(COLS),
    broadcastable to (R, COLS); loaded as _weight_params loads per-group qparams."""
    n_groups = K // GROUP_SIZE
    if GROUP_SIZE % COLS == 0:
        idx = rows * n_groups + k_start // GROUP_SIZE
        scale = tl.load(scale_ptr + idx, mask=rows_ok, other=1.0)[:, None]
    elif COLS % GROUP_SIZE == 0:
        g = k_start // GROUP_SIZE + tl.arange(0, COLS // GROUP_SIZE)
        idx = rows[:, None] * n_groups + g[None, :]
        ok = rows_ok[:, None] & (g < n_groups)[None, :]
        scale = _spread_groups(tl.load(scale_ptr + idx, mask=ok, other=1.0), GROUP_SIZE)
    else:
        idx = rows[:, None] * n_groups + (k // GROUP_SIZE)[None, :]
        scale = tl.load(scale_ptr + idx, mask=rows_ok[:, None] & k_ok[None, :], other=1.0)
    return scale


@autotune(
    rows="M",
    cols="N",
    loop="K",
    operands=("x_ptr", "w_ptr"),
    extra_key=_GRAN_KEY,
    param_bytes=_GROUP_PARAM_BYTES,
    loop_even=True,
)
@triton.jit
def fq_linear_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    w_inv_ptr,
    w_scale_ptr,
    w_zp_ptr,
    x_inv_ptr,
    x_scale_ptr,
    x_zp_ptr,
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
    w_qmax,
    x_qmin,
    x_qmax,
    W_GRAN: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    W_FLOAT_ZP: tl.constexpr,
    W_CODES: tl.constexpr,
    X_FQ: tl.constexpr,
    X_PER_ROW: tl.constexpr,
    X_CODES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LOOP_EVEN: tl.constexpr,
    X_GROUP_SIZE: tl.constexpr = 0,
):
    # X_GROUP_SIZE > 0 (with X_CODES, float8 codes): x's scales are per row and group of
    # X_GROUP_SIZE along K, (M, K // X_GROUP_SIZE) at x_scale_ptr; zero points 0.
    pid_m, pid_n = _grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    dtype = y_ptr.dtype.element_ty
    if X_GROUP_SIZE > 0:
        pass  # scales per group: each K step loads its tile's
    elif X_CODES:
        # The codes come with a scale and zero point per row; 1 / scale is never read (x_inv_ptr
        # may hold one value for the whole tensor).
        x_inv, x_scale, x_zp = _input_params(x_scale_ptr, x_scale_ptr, x_zp_ptr, rm, m_ok, True)
    elif X_FQ:
        x_inv, x_scale, x_zp = _input_params(x_inv_ptr, x_scale_ptr, x_zp_ptr, rm, m_ok, X_PER_ROW)
    else:
        x_inv, x_scale, x_zp = 1.0, 1.0, 0.0  # unused
    # Rows past M / N read rows inside the matrix (their results are never stored): the
    # loop's loads need a mask only on a partial last K step (LOOP_EVEN: K % BLOCK_K == 0).
    rm_in = rm % M
    rn_in = rn % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k = tl.arange(0, BLOCK_K).to(tl.int64) + k0 * BLOCK_K
        k_ok = k < K
        if X_GROUP_SIZE > 0:
            x_scale = _group_scales(
                x_scale_ptr, rm_in, k, m_ok, k_ok, k0 * BLOCK_K, K, X_GROUP_SIZE, BLOCK_K
            )
            x_inv, x_zp = x_scale, 0.0
        x = _input_tile(
            x_ptr + rm_in[:, None] * stride_xm + k[None, :] * stride_xk,
            k_ok[None, :],
            x_inv,
            x_scale,
            x_zp,
            x_qmin,
            x_qmax,
            dtype,
            X_FQ,
            X_CODES,
            not LOOP_EVEN,
        )
        wq = _weight_tile(
            w_ptr + rn_in[:, None] * stride_wn + k[None, :] * stride_wk,
            w_inv_ptr,
            w_scale_ptr,
            w_zp_ptr,
            rn_in,
            k,
            n_ok,
            k_ok,
            k_ok[None, :],
            k0 * BLOCK_K,
            K,
            w_qmin,
            w_qmax,
            dtype,
            W_GRAN,
            GROUP_SIZE,
            BLOCK_K,
            W_FLOAT_ZP,
            W_CODES,
            not LOOP_EVEN,
        )
        acc = tl.dot(
            dot_operand(x), tl.trans(dot_operand(wq)), acc, input_precision=INPUT_PRECISION
        )
    if HAS_BIAS:
        acc += to_fp32(tl.load(b_ptr + rn, mask=n_ok, other=0.0))[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        cast_rne(acc, dtype),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@autotune(
    rows="M",
    cols="K",
    loop="N",
    operands=("dy_ptr", "w_ptr"),
    extra_key=_GRAN_KEY,
    param_bytes=_GROUP_PARAM_BYTES,
    group_block="BLOCK_N",  # the output tile's columns run along K
    loop_even=True,
)
@triton.jit
def fq_linear_dx_kernel(
    dy_ptr,
    w_ptr,
    x_ptr,
    dx_ptr,
    w_inv_ptr,
    w_scale_ptr,
    w_zp_ptr,
    x_inv_ptr,
    x_zp_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_xm,
    stride_xk,
    stride_dxm,
    stride_dxk,
    w_qmin,
    w_qmax,
    x_qmin,
    x_qmax,
    W_GRAN: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    W_FLOAT_ZP: tl.constexpr,
    W_CODES: tl.constexpr,
    X_FQ: tl.constexpr,
    X_PER_ROW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LOOP_EVEN: tl.constexpr,
):
    # Output tile (BLOCK_M rows of M, BLOCK_N cols of K); the loop runs over N in BLOCK_K.
    pid_m, pid_k = _grouped_pid(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    k_ok = rk < K
    dtype = dy_ptr.dtype.element_ty
    # Rows past M and cols past K read inside the matrix (never stored): only a partial last
    # N step needs a mask (LOOP_EVEN: N % BLOCK_K == 0).
    rm_in = rm % M
    rk_in = rk % K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, tl.cdiv(N, BLOCK_K)):
        rn = tl.arange(0, BLOCK_K).to(tl.int64) + n0 * BLOCK_K
        n_ok = rn < N
        dy = _load_operand(
            dy_ptr + rm_in[:, None] * stride_dym + rn[None, :] * stride_dyn,
            n_ok[None, :],
            not LOOP_EVEN,
        )
        wq = _weight_tile(
            w_ptr + rn[:, None] * stride_wn + rk_in[None, :] * stride_wk,
            w_inv_ptr,
            w_scale_ptr,
            w_zp_ptr,
            rn,
            rk_in,
            n_ok,
            k_ok,
            n_ok[:, None],
            pid_k * BLOCK_N,
            K,
            w_qmin,
            w_qmax,
            dtype,
            W_GRAN,
            GROUP_SIZE,
            BLOCK_N,
            W_FLOAT_ZP,
            W_CODES,
            not LOOP_EVEN,
        )
        acc = tl.dot(dot_operand(dy), dot_operand(wq), acc, input_precision=INPUT_PRECISION)
    out_ok = m_ok[:, None] & k_ok[None, :]
    if X_FQ:
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=out_ok, other=0.0
        )
        x_inv, _, x_zp = _input_params(x_inv_ptr, x_inv_ptr, x_zp_ptr, rm, m_ok, X_PER_ROW)
        qf = quantize_unclamped(to_fp32(x), x_inv, x_zp, False)
        acc = acc * ((qf >= x_qmin) & (qf <= x_qmax)).to(tl.float32)
    tl.store(
        dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk,
        cast_rne(acc, dx_ptr.dtype.element_ty),
        mask=out_ok,
    )


@autotune(
    rows="N", cols="K", loop="M", operands=("dy_ptr", "x_ptr"), extra_key=_GRAN_KEY, loop_even=True
)
@triton.jit
def fq_linear_dw_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    dw_ptr,
    w_inv_ptr,
    w_zp_ptr,
    x_inv_ptr,
    x_scale_ptr,
    x_zp_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_dwn,
    stride_dwk,
    w_qmin,
    w_qmax,
    x_qmin,
    x_qmax,
    W_GRAN: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    W_FLOAT_ZP: tl.constexpr,
    X_FQ: tl.constexpr,
    X_PER_ROW: tl.constexpr,
    X_CODES: tl.constexpr,
    W_MASK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LOOP_EVEN: tl.constexpr,
    X_GROUP_SIZE: tl.constexpr = 0,
):
    # Output tile (BLOCK_M rows of N, BLOCK_N cols of K); the loop runs over M in BLOCK_K.
    # W_MASK False: no straight-through mask on dW (FP8 weights; the w qparams are unread).
    # X_CODES: x_ptr holds x's int8 codes, with a scale and zero point (minus shift) per row,
    # or float8 codes with a scale per row and group of X_GROUP_SIZE along K (zero points 0).
    pid_n, pid_k = _grouped_pid(tl.program_id(0), N, K, BLOCK_M, BLOCK_N, GROUP_M)
    rn = pid_n.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    k_ok = rk < K
    dtype = dy_ptr.dtype.element_ty
    if X_CODES or (X_FQ and X_PER_ROW):
        pass  # the loop runs over rows of x: each step loads its rows' qparams
    elif X_FQ:
        x_inv, x_scale, x_zp = _input_params(x_inv_ptr, x_scale_ptr, x_zp_ptr, 0, True, False)
    else:
        x_inv, x_scale, x_zp = 1.0, 1.0, 0.0  # unused
    # Rows past N and cols past K read inside the matrix (never stored): only a partial last
    # M step needs a mask (LOOP_EVEN: M % BLOCK_K == 0).
    rn_in = rn % N
    rk_in = rk % K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, tl.cdiv(M, BLOCK_K)):
        rm = tl.arange(0, BLOCK_K).to(tl.int64) + m0 * BLOCK_K
        m_ok = rm < M
        dy_t = _load_operand(
            dy_ptr + rn_in[:, None] * stride_dyn + rm[None, :] * stride_dym,
            m_ok[None, :],
            not LOOP_EVEN,
        )
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk_in[None, :] * stride_xk
        if X_GROUP_SIZE > 0:
            # float8 codes with a scale per row and group of X_GROUP_SIZE along K, zp 0
            x_scale = _group_scales(
                x_scale_ptr, rm, rk_in, m_ok, k_ok, pid_k * BLOCK_N, K, X_GROUP_SIZE, BLOCK_N
            )
            x_inv, x_zp = x_scale, 0.0
        elif X_CODES:
            # (c - zp) * scale per row, bit for bit the fq tile; 1 / scale is never read
            x_inv, x_scale, x_zp = _input_params(x_scale_ptr, x_scale_ptr, x_zp_ptr, rm, m_ok, True)
        elif X_FQ and X_PER_ROW:
            x_inv, x_scale, x_zp = _input_params(x_inv_ptr, x_scale_ptr, x_zp_ptr, rm, m_ok, True)
        x = _input_tile(
            x_ptrs,
            m_ok[:, None],
            x_inv,
            x_scale,
            x_zp,
            x_qmin,
            x_qmax,
            dtype,
            X_FQ,
            X_CODES,
            not LOOP_EVEN,
        )
        acc = tl.dot(dot_operand(dy_t), dot_operand(x), acc, input_precision=INPUT_PRECISION)
    out_ok = n_ok[:, None] & k_ok[None, :]
    if dw_ptr.dtype.element_ty != dtype:
        # fp32 master weights: the composition's dW is a product in the input dtype, widened.
        acc = to_fp32(cast_rne(acc, dtype))
    if W_MASK:
        w = tl.load(
            w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=out_ok, other=0.0
        )
        w_inv, _, w_zp = _weight_params(
            w_inv_ptr,
            w_inv_ptr,
            w_zp_ptr,
            rn,
            rk,
            n_ok,
            k_ok,
            pid_k * BLOCK_N,
            K,
            W_GRAN,
            GROUP_SIZE,
            BLOCK_N,
        )
        qf = quantize_unclamped(to_fp32(w), w_inv, w_zp, W_FLOAT_ZP)
        acc = acc * ((qf >= w_qmin) & (qf <= w_qmax)).to(tl.float32)
    tl.store(
        dw_ptr + rn[:, None] * stride_dwn + rk[None, :] * stride_dwk,
        cast_rne(acc, dw_ptr.dtype.element_ty),
        mask=out_ok,
    )


def _grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)


def _quant_ranges(lq: LinearQuant) -> tuple[float, float, float, float]:
    return float(lq.w_qmin), float(lq.w_qmax), float(lq.x_qmin), float(lq.x_qmax)


def input_precision(dtype: torch.dtype) -> str:
    """tf32 for fp32 operands when torch allows TF32 matmuls, else exact "ieee"."""
    if dtype != torch.float32:
        return "ieee"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # the newer torch API
    if precision is not None:
        return "tf32" if precision == "tf32" else "ieee"
    return "tf32" if matmul.allow_tf32 else "ieee"


class QuantizedInput(NamedTuple):
    """x's int8 codes (M, K) for the forward GEMM (X_CODES): q - shift per element, and per
    row its scale and its zero point minus shift."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor


def _x_group(x_codes: QuantizedInput | None, x_group_size: int) -> dict:
    """X_GROUP_SIZE for a launch: passed only when on, so the launches without it (and their
    compiled kernels) are the ones before the per-group input mode existed."""
    if x_group_size <= 0:
        return {}
    if x_codes is None or x_codes.codes.dtype.is_floating_point is False:
        raise ValueError("x_group_size needs x_codes holding float8 codes")
    return {"X_GROUP_SIZE": x_group_size}


def _weight_operand(w: Tensor, lq: LinearQuant, codes: IntWeight | None) -> tuple[Tensor, Tensor]:
    """The GEMMs' weight operand and zero points: the float weight, or its int8 codes."""
    return (w, lq.w_zp) if codes is None else (codes.codes, codes.zero_point)


def fq_linear_forward(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None,
    lq: LinearQuant,
    codes: IntWeight | None = None,
    x_codes: QuantizedInput | None = None,
    x_group_size: int = 0,
) -> Tensor:
    """y (M, N) in x's dtype from x (M, K) and w (N, K); any strides. With `codes` (w's int8
    codes from int_matmul.fused_weight_codes) the GEMM reads them instead of fake-quantizing
    w itself, with `x_codes` (int_matmul.fused_input_codes) x's: the same fq tiles, bit for
    bit. x_group_size > 0: x_codes are float8 codes with one scale per row and group of
    x_group_size along K (scale (M * K // x_group_size,), zero points 0)."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    x_inv, x_scale, x_zp = lq.x_tensors(x)
    x_op, x_per_row = x, lq.x_per_row
    if x_codes is not None:
        x_op, x_scale, x_zp, x_per_row = x_codes.codes, x_codes.scale, x_codes.zero_point, True
    w_op, w_zp = _weight_operand(w, lq, codes)
    fq_linear_fwd_kernel[_grid(m, n)](
        x_op,
        w_op,
        y if bias is None else bias.contiguous(),
        y,
        lq.w_inv,
        lq.w_scale,
        w_zp,
        x_inv,
        x_scale,
        x_zp,
        m,
        n,
        k,
        x_op.stride(0),
        x_op.stride(1),
        w_op.stride(0),
        w_op.stride(1),
        y.stride(0),
        y.stride(1),
        *_quant_ranges(lq),
        W_GRAN=lq.w_gran,
        GROUP_SIZE=max(lq.group_size, 1),
        W_FLOAT_ZP=lq.w_float_zp,
        W_CODES=codes is not None,
        X_FQ=lq.x_fq,
        X_PER_ROW=x_per_row,
        X_CODES=x_codes is not None,
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=input_precision(x.dtype),
        **_x_group(x_codes, x_group_size),
        # x * inv + 1.5 * 2**23 must not become one FMA: it would round the exact product.
        enable_fp_fusion=False,
    )
    return y


def fq_linear_grad_input(
    dy: Tensor, x: Tensor, w: Tensor, lq: LinearQuant, codes: IntWeight | None = None
) -> Tensor:
    """dx (M, K) = (dy @ fq_w(w)) * mask_x(x), in x's dtype; `codes` as fq_linear_forward."""
    m, n = dy.shape
    k = w.shape[1]
    dx = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    x_inv, _, x_zp = lq.x_tensors(x)
    w_op, w_zp = _weight_operand(w, lq, codes)
    fq_linear_dx_kernel[_grid(m, k)](
        dy,
        w_op,
        x,
        dx,
        lq.w_inv,
        lq.w_scale,
        w_zp,
        x_inv,
        x_zp,
        m,
        n,
        k,
        dy.stride(0),
        dy.stride(1),
        w_op.stride(0),
        w_op.stride(1),
        x.stride(0),
        x.stride(1),
        dx.stride(0),
        dx.stride(1),
        *_quant_ranges(lq),
        W_GRAN=lq.w_gran,
        GROUP_SIZE=max(lq.group_size, 1),
        W_FLOAT_ZP=lq.w_float_zp,
        W_CODES=codes is not None,
        X_FQ=lq.x_fq,
        X_PER_ROW=lq.x_per_row,
        INPUT_PRECISION=input_precision(dy.dtype),
        enable_fp_fusion=False,
    )
    return dx


def fq_linear_grad_weight(
    dy: Tensor,
    x: Tensor,
    w: Tensor,
    lq: LinearQuant,
    x_codes: QuantizedInput | None = None,
    weight_mask: bool = True,
    x_group_size: int = 0,
) -> Tensor:
    """dw (N, K) = (dy^T @ fq_x(x)) * mask_w(w), in w's dtype; `x_codes` and x_group_size as
    fq_linear_forward; weight_mask False: no mask (FP8 weights, whose lq.w_* are unread)."""
    m, n = dy.shape
    k = w.shape[1]
    dw = torch.empty((n, k), dtype=w.dtype, device=w.device)
    if n == 0 or k == 0:
        return dw
    if m == 0:
        return dw.zero_()
    x_inv, x_scale, x_zp = lq.x_tensors(x)
    x_op, x_per_row = x, lq.x_per_row
    if x_codes is not None:
        x_op, x_scale, x_zp, x_per_row = x_codes.codes, x_codes.scale, x_codes.zero_point, True
    fq_linear_dw_kernel[_grid(n, k)](
        dy,
        x_op,
        w,
        dw,
        lq.w_inv,
        lq.w_zp,
        x_inv,
        x_scale,
        x_zp,
        m,
        n,
        k,
        dy.stride(0),
        dy.stride(1),
        x_op.stride(0),
        x_op.stride(1),
        w.stride(0),
        w.stride(1),
        dw.stride(0),
        dw.stride(1),
        *_quant_ranges(lq),
        W_GRAN=lq.w_gran,
        GROUP_SIZE=max(lq.group_size, 1),
        W_FLOAT_ZP=lq.w_float_zp,
        X_FQ=lq.x_fq,
        X_PER_ROW=x_per_row,
        X_CODES=x_codes is not None,
        W_MASK=weight_mask,
        INPUT_PRECISION=input_precision(dy.dtype),
        **_x_group(x_codes, x_group_size),
        enable_fp_fusion=False,
    )
    return dw
