"""Microscaling kernels (MXFP8, MXFP4, NVFP4): fake quant, float8 codes and the fused linear.

The numerics are triton_qat/numerics/microscaling.py's, bit for bit. One program takes
BLOCK_M rows by BLOCK_G blocks of BLOCK_SIZE consecutive elements along the last dim:

    MX      E = exponent field of the block's amax; s = max(E - emax, -127); X = 2**s
            (NaN for E = 128: an inf or a NaN); q = round_element(x * 2**-s)
    NVFP4   s_b = e4m3((amax_b / 6) / s_t); r = (1 / s_t) / s_b (0 where s_b = 0)
            q = round_e2m1(x * r); decode scale s_t * s_b
    fq(x) = cast(q * scale, x.dtype), scale X or s_t * s_b (one fp32 value per block)

The tensor scale s_t comes from a first pass (AMAX_ONLY: the blocks' amax) and the reference's
formula on those amaxes. Every element value (e4m3, e2m1) is a float8_e4m3fn value, so the
codes are stored as float8_e4m3fn (exact) with one fp32 scale per block, and the fused GEMMs of
fq_matmul.py read them per group (W_GRAN 2 with W_CODES for a weight, X_GROUP_SIZE with X_CODES
for an input): c * scale, cast to the input dtype, is the fq tile bit for bit. A block holding
an inf or a NaN (or, with NVFP4, a tensor holding one) has a NaN scale: every element NaN.
Rounding works in fp32 with the exponent bits (round_to_float8 of kernels/float8.py: e2m1 is
its case FMAX 6, MBITS 1, EMIN 0), so interpreter and GPU give the same codes.

    microscaling_codes(x2d, spec)            (codes (M, K) float8_e4m3fn, scales (M, K // bs))
    fake_quantize_microscaling(x2d, spec)    fq(x) in x's dtype
    mx_linear_forward / mx_linear_backward   the fused QAT linear with microscaling weights and,
                                             optionally, inputs; straight through, no mask
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_qat.kernels import INTERPRETED_KERNELS
from triton_qat.kernels.float8 import _pow2, round_to_float8
from triton_qat.kernels.fq_matmul import (
    QuantizedInput,
    fq_linear_forward,
    fq_linear_grad_input,
    fq_linear_grad_weight,
)
from triton_qat.kernels.rounding import INTERPRETED, cast_rne, to_fp32
from triton_qat.numerics.microscaling import (
    E2M1_MAX,
    E4M3,
    MX_FORMATS,
    NVFP4,
    MicroscalingFormat,
    nvfp4_tensor_scale_ref,
)
from triton_qat.numerics.qparams import LinearQuant

NAN: tl.constexpr = tl.constexpr(float("nan"))
INF: tl.constexpr = tl.constexpr(float("inf"))
# fp32 bits of 2**-127 (e8m0's smallest scale, an fp32 subnormal).
TWO_POW_M127_BITS: tl.constexpr = tl.constexpr(0x00400000)


@triton.jit
def _e8m0_scale(s):
    """2.0**s in fp32 for int32 s in [-127, 127], from the bits (2**-127 is subnormal)."""
    bits = tl.where(s >= -126, (s + 127) << 23, TWO_POW_M127_BITS)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def microscaling_kernel(
    x_ptr,
    codes_ptr,
    scale_ptr,
    y_ptr,
    tensor_scale_ptr,
    M,
    G,
    stride_xm,
    stride_xk,
    stride_cm,
    stride_ck,
    stride_ym,
    stride_yk,
    NVFP4_SCALES: tl.constexpr,
    EMAX: tl.constexpr,
    FMAX: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_SIZE_P2: tl.constexpr,
    AMAX_ONLY: tl.constexpr,
    WRITE_CODES: tl.constexpr,
    WRITE_Y: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """BLOCK_M rows by BLOCK_G blocks of x (M, G * BLOCK_SIZE): the blocks' amax (AMAX_ONLY:
    stored to scale_ptr (M, G), nothing else), else their scales (MX: e8m0 from EMAX;
    NVFP4_SCALES: e4m3 block scales under the tensor scale at tensor_scale_ptr[0]) stored to
    scale_ptr, then the elements (FMAX, MBITS, EMIN) as float8 codes (WRITE_CODES) and / or
    the fake-quantized values in y's dtype (WRITE_Y)."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.program_id(1).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_SIZE_P2).to(tl.int64)
    k = g[None, :, None] * BLOCK_SIZE + j[None, None, :]
    block_ok = (rm < M)[:, None] & (g < G)[None, :]
    ok = block_ok[:, :, None] & (j < BLOCK_SIZE)[None, None, :]
    x = tl.load(x_ptr + rm[:, None, None] * stride_xm + k * stride_xk, mask=ok, other=0)
    xf = to_fp32(x)
    a = tl.abs(xf)
    # torch's amax propagates NaN; GPU max reductions drop it.
    has_nan = tl.max((a != a).to(tl.int32), axis=2)
    amax = tl.where(has_nan > 0, NAN, tl.max(a, axis=2))
    s_ptrs = scale_ptr + rm[:, None] * G + g[None, :]
    if AMAX_ONLY:
        tl.store(s_ptrs, amax, mask=block_ok)
        return
    if NVFP4_SCALES:
        s_t = tl.load(tensor_scale_ptr + tl.zeros_like(amax).to(tl.int64))
        # True divisions, as torch's; "/" may be approximate on a GPU.
        quotient = tl.math.div_rn(tl.math.div_rn(amax, tl.zeros_like(amax) + 6.0), s_t)
        s_b = round_to_float8(quotient, 448.0, 3, -6)
        s_b = tl.where(quotient == INF, NAN, s_b)  # e4m3 has no infinity
        inv_t = tl.math.div_rn(tl.zeros_like(amax) + 1.0, s_t)
        r = tl.where(s_b > 0.0, tl.math.div_rn(inv_t, tl.where(s_b > 0.0, s_b, 1.0)), 0.0)
        v = xf * r[:, :, None]
        scale = s_t * s_b
    else:
        e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # 128: inf or NaN
        s = tl.maximum(e - EMAX, -127)
        scale = tl.where(e == 128, NAN, _e8m0_scale(s))
        # The reference's product: below 2**(EMAX + 1), rounded only in fp32's subnormal range.
        v = xf * _pow2(0 - s)[:, :, None]
    tl.store(s_ptrs, scale, mask=block_ok)
    q = round_to_float8(v, FMAX, MBITS, EMIN)
    if WRITE_CODES:
        c = q.to(codes_ptr.dtype.element_ty)
        if INTERPRETED:  # its float8 cast turns NaN into a number: store NaN's bits
            nan8 = tl.full(q.shape, 0x7F, tl.uint8).to(codes_ptr.dtype.element_ty, bitcast=True)
            c = tl.where(q != q, nan8, c)
        tl.store(codes_ptr + rm[:, None, None] * stride_cm + k * stride_ck, c, mask=ok)
    if WRITE_Y:
        y = cast_rne(q * scale[:, :, None], y_ptr.dtype.element_ty)
        tl.store(y_ptr + rm[:, None, None] * stride_ym + k * stride_yk, y, mask=ok)


class MicroscalingSpec(NamedTuple):
    """One operand's microscaling fake quant: format ("mxfp8", "mxfp4", "nvfp4"), block size
    along the last dim, and for NVFP4 whether a tensor scale applies and its amax floor."""

    fmt: str
    block_size: int
    per_tensor_scale: bool = True
    eps: float = 1e-12

    @property
    def format(self) -> MicroscalingFormat:
        return NVFP4 if self.fmt == "nvfp4" else MX_FORMATS[self.fmt]


# Elements per program (rows by blocks). Compiled: 4 rows per program (more rows of few
# blocks near the register limit: 256 rows of one 16-block take 254 on sm_90). Interpreted,
# where a program's operations run once over numpy arrays and the cost is the number of
# programs: where a row holds few blocks a program takes more rows (a test shrinks the tile
# to cover several programs per row and per column).
_MIN_BLOCK_M = 4
_MAX_BLOCK_M = 8192 if INTERPRETED_KERNELS else _MIN_BLOCK_M
_TILE = 8192 if INTERPRETED_KERNELS else 4096


def _tile(m: int, groups: int, bs_p2: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_G): blocks per program up to _TILE elements over _MIN_BLOCK_M rows,
    then as many rows (powers of two, at most M's and _MAX_BLOCK_M) as the tile holds."""
    block_g = max(1, min(triton.next_power_of_2(groups), _TILE // (_MIN_BLOCK_M * bs_p2)))
    rows = min(triton.next_power_of_2(m), _TILE // (block_g * bs_p2), _MAX_BLOCK_M)
    return max(_MIN_BLOCK_M, rows), block_g


def _launch(x2d: Tensor, spec: MicroscalingSpec, scale, tensor_scale, codes, y, amax_only):
    m, k = x2d.shape
    bs = spec.block_size
    groups = k // bs
    bs_p2 = triton.next_power_of_2(bs)
    block_m, block_g = _tile(m, groups, bs_p2)
    fmt = spec.format
    if fmt.element == "e4m3":
        fmax, mbits, emin = E4M3.fmax, E4M3.mbits, E4M3.emin
    else:
        fmax, mbits, emin = E2M1_MAX, 1, 0
    dummy = scale  # never written when its flag is off
    codes_t = dummy if codes is None else codes
    y_t = dummy if y is None else y
    microscaling_kernel[(triton.cdiv(m, block_m), triton.cdiv(groups, block_g))](
        x2d,
        codes_t,
        scale,
        y_t,
        dummy if tensor_scale is None else tensor_scale,
        m,
        groups,
        x2d.stride(0),
        x2d.stride(1),
        codes_t.stride(0) if codes is not None else 0,
        codes_t.stride(1) if codes is not None else 0,
        y_t.stride(0) if y is not None else 0,
        y_t.stride(1) if y is not None else 0,
        NVFP4_SCALES=fmt.scale == "e4m3",
        EMAX=fmt.emax,
        FMAX=fmax,
        MBITS=mbits,
        EMIN=emin,
        BLOCK_SIZE=bs,
        BLOCK_SIZE_P2=bs_p2,
        AMAX_ONLY=amax_only,
        WRITE_CODES=codes is not None,
        WRITE_Y=y is not None,
        BLOCK_M=block_m,
        BLOCK_G=block_g,
        enable_fp_fusion=False,
    )


def nvfp4_tensor_scale(x2d: Tensor, spec: MicroscalingSpec) -> Tensor:
    """The fp32 tensor scale s_t of x2d, shape (1,): the blocks' amax by the kernel, then the
    reference's formula on them (the amax of the amaxes is the tensor's, NaN included); 1.0
    without per_tensor_scale."""
    if not spec.per_tensor_scale:
        return torch.ones(1, dtype=torch.float32, device=x2d.device)
    m, k = x2d.shape
    amax = torch.empty((m, k // spec.block_size), dtype=torch.float32, device=x2d.device)
    _launch(x2d, spec, amax, None, None, None, True)
    return nvfp4_tensor_scale_ref(amax, spec.eps).reshape(1)


def _quantize(x2d: Tensor, spec: MicroscalingSpec, codes, y) -> Tensor:
    """The block scales (M, K // block_size), fp32, written with the codes and / or fq(x)."""
    m, k = x2d.shape
    scale = torch.empty((m, k // spec.block_size), dtype=torch.float32, device=x2d.device)
    if m == 0 or k == 0:
        return scale
    s_t = nvfp4_tensor_scale(x2d, spec) if spec.fmt == "nvfp4" else None
    _launch(x2d, spec, scale, s_t, codes, y, False)
    return scale


def microscaling_codes(x2d: Tensor, spec: MicroscalingSpec) -> tuple[Tensor, Tensor]:
    """(codes, scales): x2d's element values (M, K) as float8_e4m3fn, contiguous, and one fp32
    scale per block (M, K // block_size) (MX: 2**s; NVFP4: the decode scale s_t * s_b; NaN
    for a non-finite block): codes.float() * scale is fq(x) before the cast to x's dtype."""
    codes = torch.empty(x2d.shape, dtype=torch.float8_e4m3fn, device=x2d.device)
    return codes, _quantize(x2d, spec, codes, None)


def fake_quantize_microscaling(x2d: Tensor, spec: MicroscalingSpec) -> Tensor:
    """fq(x2d) in its dtype (fake_quantize_mx_ref / fake_quantize_nvfp4_ref, bit for bit)."""
    y = torch.empty(x2d.shape, dtype=x2d.dtype, device=x2d.device)
    _quantize(x2d, spec, None, y)
    return y


# --- the fused microscaling QAT linear ------------------------------------------------------


def _operand(t: Tensor, spec: MicroscalingSpec) -> QuantizedInput:
    """t's float8 codes (rows, K) and one scale per (row, block), zero points 0, as the fused
    GEMMs read them per group: (c - 0) * scale is the fake quant's q * scale."""
    codes, scale = microscaling_codes(t, spec)
    scale = scale.reshape(-1)
    return QuantizedInput(codes, scale, torch.zeros_like(scale, dtype=torch.int32))


def _linear_quant(
    w: QuantizedInput | None, w_block: int, x: QuantizedInput | None, like: Tensor
) -> LinearQuant:
    """The fused GEMMs' qparams for per-block codes (as float8._linear_quant): the weight's
    scales per group (w None: dW, which reads no weight qparams), the input's per row and
    block (passed with X_GROUP_SIZE), zero zero points; 1 / scale and the integer ranges are
    never read (codes, no straight-through mask)."""
    if w is None:
        one = like.new_ones(1, dtype=torch.float32)
        w_args = (one, one, one.to(torch.int32), 0, 0, 0)
    else:
        w_args = (w.scale, w.scale, w.zero_point, 0, 0, w_block)
    if x is None:
        return LinearQuant(*w_args)
    return LinearQuant(*w_args, x.scale, x.scale, x.zero_point, 0, 0, True)


def mx_linear_forward(
    x2d: Tensor,
    w: Tensor,
    bias: Tensor | None,
    w_spec: MicroscalingSpec,
    x_spec: MicroscalingSpec | None,
    w_codes: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """F.linear(fq(x2d), fq(w).to(x2d.dtype), bias) in x2d's dtype: the float GEMM reads the
    weight's codes (and the input's, with x_spec) per block, so its tiles are the fq tiles bit
    for bit. w_codes: w's float8 codes (N, K) and fp32 block scales (N, K // block) as stored
    (a converted layer; w then gives only the shape), what this pass would write."""
    if w_codes is None:
        wq = _operand(w, w_spec)
    else:
        scale = w_codes[1].reshape(-1).contiguous()
        wq = QuantizedInput(w_codes[0], scale, torch.zeros_like(scale, dtype=torch.int32))
    xq = None if x_spec is None else _operand(x2d, x_spec)
    lq = _linear_quant(wq, w_spec.block_size, xq, x2d)
    x_group = 0 if x_spec is None else x_spec.block_size
    return fq_linear_forward(x2d, w, bias, lq, wq, xq, x_group_size=x_group)


def mx_linear_backward(
    dy: Tensor,
    x2d: Tensor,
    w: Tensor,
    w_spec: MicroscalingSpec,
    x_spec: MicroscalingSpec | None,
    need_dx: bool,
    need_dw: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(dx, dw) = (dy @ fq(w), dy^T @ fq(x)) straight through (no mask), each GEMM reading
    its operand's codes, made here and freed after it; the larger codes first (as
    float8.fp8_linear_backward)."""
    dx = dw = None

    def grad_input():
        wq = _operand(w, w_spec)
        lq = _linear_quant(wq, w_spec.block_size, None, dy)
        return fq_linear_grad_input(dy, x2d, w, lq, wq)

    def grad_weight():
        if x_spec is None:
            lq = _linear_quant(None, 0, None, dy)
            return fq_linear_grad_weight(dy, x2d, w, lq, weight_mask=False)
        xq = _operand(x2d, x_spec)
        lq = _linear_quant(None, 0, xq, dy)
        return fq_linear_grad_weight(
            dy, x2d, w, lq, xq, weight_mask=False, x_group_size=x_spec.block_size
        )

    x_first = need_dw and x_spec is not None and x2d.shape[0] > w.shape[0]
    if x_first:
        dw = grad_weight()
    if need_dx:
        dx = grad_input()
    if need_dw and not x_first:
        dw = grad_weight()
    return dx, dw
