"""Dynamic per-token qparams: one light pass over the (M, K) input that reduces each row to
its min / max and writes the row's scale, 1 / scale and zero point, bit for bit as
triton_qat.numerics.reference.per_token_qparams_ref (torch.ao's Python observer formulas in fp32).

The fused GEMMs (fq_matmul.py) then fake-quantize the input tiles with these per-row vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from triton_qat.kernels import INTERPRETED_KERNELS
from triton_qat.kernels.rounding import negate, round_half_even, to_fp32
from triton_qat.numerics.qparams import PerTokenQParams

INF: tl.constexpr = tl.constexpr(float("inf"))
NAN: tl.constexpr = tl.constexpr(float("nan"))


@triton.jit
def per_token_qparams_kernel(
    x_ptr,
    scale_ptr,
    inv_ptr,
    zp_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    quant_min,
    quant_max,
    divisor,
    eps,
    symmetric_zero_point,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    lo = tl.full((BLOCK_M,), INF, tl.float32)
    hi = tl.full((BLOCK_M,), -INF, tl.float32)
    has_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k = tl.arange(0, BLOCK_K).to(tl.int64) + k0 * BLOCK_K
        ok = m_ok[:, None] & (k < K)[None, :]
        x = to_fp32(
            tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :] * stride_xk, mask=ok, other=0.0)
        )
        lo = tl.minimum(lo, tl.min(tl.where(ok, x, INF), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(ok, x, -INF), axis=1))
        has_nan = tl.maximum(has_nan, tl.max((ok & (x != x)).to(tl.int32), axis=1))
    # torch.aminmax propagates NaN; GPU min / max reductions drop it. An empty row is 0.
    lo = tl.where(has_nan > 0, NAN, tl.where(K > 0, lo, 0.0))
    hi = tl.where(has_nan > 0, NAN, tl.where(K > 0, hi, 0.0))
    min_neg = tl.minimum(lo, 0.0, propagate_nan=tl.PropagateNan.ALL)
    max_pos = tl.maximum(hi, 0.0, propagate_nan=tl.PropagateNan.ALL)
    zeros = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # True (correctly rounded) divisions, as torch's; "/" may be approximate on a GPU.
    if SYMMETRIC:
        amax = tl.maximum(negate(min_neg), max_pos, propagate_nan=tl.PropagateNan.ALL)
        scale = tl.math.div_rn(amax, zeros + divisor)
        scale = tl.maximum(scale, zeros + eps, propagate_nan=tl.PropagateNan.ALL)
        zp = (zeros + symmetric_zero_point).to(tl.int32)
    else:
        scale = tl.math.div_rn(max_pos - min_neg, zeros + divisor)
        scale = tl.maximum(scale, zeros + eps, propagate_nan=tl.PropagateNan.ALL)
        r = round_half_even(tl.math.div_rn(min_neg, scale))
        # |r| <= quant_max - quant_min here, so quant_min - r is exact in fp32.
        zpf = tl.minimum(tl.maximum(quant_min - r, quant_min), quant_max)
        # NaN / inf rows (and a zero scale): zero point quant_min, as the reference defines.
        finite = (tl.abs(lo) < INF) & (tl.abs(hi) < INF) & (scale != 0.0)
        zp = tl.where(finite, zpf, zeros + quant_min).to(tl.int32)
    inv = tl.math.div_rn(zeros + 1.0, scale)
    tl.store(scale_ptr + rm, scale, mask=m_ok)
    tl.store(inv_ptr + rm, inv, mask=m_ok)
    tl.store(zp_ptr + rm, zp, mask=m_ok)


# Rows per program and columns per step: small tiles under the interpreter.
_BLOCK_M = 4
_MAX_BLOCK_K = 128 if INTERPRETED_KERNELS else 1024


def per_token_qparams(x: Tensor, spec: PerTokenQParams) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, 1 / scale, zero point) of each row of x (M, K), any strides: fp32, fp32,
    int32, each of shape (M,)."""
    m, k = x.shape
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    inv = torch.empty_like(scale)
    zp = torch.empty(m, dtype=torch.int32, device=x.device)
    if m == 0:
        return scale, inv, zp
    span = float(spec.quant_max - spec.quant_min)
    per_token_qparams_kernel[(triton.cdiv(m, _BLOCK_M),)](
        x,
        scale,
        inv,
        zp,
        m,
        k,
        x.stride(0),
        x.stride(1),
        float(spec.quant_min),
        float(spec.quant_max),
        span / 2 if spec.symmetric else span,
        float(spec.eps),
        float(spec.symmetric_zero_point),
        SYMMETRIC=spec.symmetric,
        BLOCK_M=_BLOCK_M,
        BLOCK_K=min(_MAX_BLOCK_K, triton.next_power_of_2(max(k, 16))),
        enable_fp_fusion=False,
    )
    return scale, inv, zp
