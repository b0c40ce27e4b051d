"""Quantization ranges of torch's dtypes and the observers' qparams formulas (NUMERICS.md,
"Observers"), as torch.ao computes them: plain torch, no modules."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from triton_qat.numerics.qparams import PerTokenQParams, RowQuant, check_quant_range
from triton_qat.numerics.reference import divide_fp32 as _div
from triton_qat.numerics.reference import minmax_qparams

FP32_EPS = torch.finfo(torch.float32).eps
# torch's ChooseQuantizationParams (CPU) raises smaller scales to this (2**-14, fp16's limit).
SMALL_SCALE_THRESHOLD = float(torch.tensor(6.1e-5, dtype=torch.float32))

PER_TENSOR_SCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
PER_CHANNEL_SCHEMES = (torch.per_channel_affine, torch.per_channel_symmetric)
SYMMETRIC_SCHEMES = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
# Per channel with a float zero point (torch.ao's embedding qconfigs).
FLOAT_QPARAMS = torch.per_channel_affine_float_qparams
ALLOWED_DTYPES = (
    torch.qint8,
    torch.quint8,
    torch.quint4x2,
    torch.qint32,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
    torch.uint16,
)
# torch.iinfo does not know every quantized dtype (quint4x2 raises).
DTYPE_RANGE = {
    torch.quint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.quint4x2: (0, 15),
    torch.quint2x4: (0, 3),
    torch.qint32: (-(2**31), 2**31 - 1),
}


# --- quantization ranges ---------------------------------------------------------------------


def dtype_range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype in DTYPE_RANGE:
        return DTYPE_RANGE[dtype]
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


def validate_custom_qrange(quant_min: int, quant_max: int) -> None:
    if not quant_min <= 0 <= quant_max:
        raise ValueError(
            f"the quantization range [quant_min, quant_max] must include 0, "
            f"got [{quant_min}, {quant_max}]"
        )
    if quant_min >= quant_max:
        raise ValueError(
            f"quant_min must be strictly less than quant_max, got {quant_min} >= {quant_max}"
        )


def quant_range(
    quant_min: int | None,
    quant_max: int | None,
    dtype: torch.dtype,
    reduce_range: bool,
) -> tuple[int, int, bool]:
    """(quant_min, quant_max, has_customized_qrange), as torch.ao's calculate_qmin_qmax."""
    custom = quant_min is not None and quant_max is not None
    if custom:
        assert quant_min is not None and quant_max is not None
        validate_custom_qrange(quant_min, quant_max)
        length = quant_max - quant_min + 1
        if dtype in (torch.qint8, torch.int8) and not 0 < length <= 256:
            raise ValueError(
                f"quant_max - quant_min + 1 must be within (0, 256] for {dtype}, got {length}"
            )
        if dtype in (torch.qint32, torch.int32) and not 0 < length <= 2**32:
            raise ValueError(
                f"quant_max - quant_min + 1 must be within (0, 2**32] for {dtype}, got {length}"
            )
        if reduce_range:
            quant_min, quant_max = quant_min // 2, quant_max // 2
        return quant_min, quant_max, True
    if dtype in (torch.qint8, torch.int8):
        lo, hi = (-64, 63) if reduce_range else (-128, 127)
    elif dtype in (torch.quint8, torch.uint8):
        lo, hi = (0, 127) if reduce_range else (0, 255)
    elif dtype in (torch.qint32, torch.int32):
        lo, hi = -(2**31), 2**31 - 1
    elif dtype == torch.uint16:
        lo, hi = 0, 2**16 - 1
    elif dtype == torch.int16:
        lo, hi = -(2**15), 2**15 - 1
    else:
        lo, hi = 0, 15
    return lo, hi, False


# --- qparams formulas (NUMERICS.md, "Observers") ---------------------------------------------


def observer_minmax_qparams(
    min_val: Tensor,
    max_val: Tensor,
    quant_min: int,
    quant_max: int,
    qscheme: torch.qscheme,
    dtype: torch.dtype,
    has_customized_qrange: bool,
    eps: Tensor,
) -> tuple[Tensor, Tensor]:
    """torch.ao's UniformQuantizationObserverBase._calculate_qparams, after its validity check
    (the formula: reference.minmax_qparams)."""
    if qscheme == FLOAT_QPARAMS:
        return float_qparams(min_val, max_val, quant_min, quant_max, eps)
    symmetric = qscheme in SYMMETRIC_SCHEMES
    zp = symmetric_zero_point(quant_min, quant_max, dtype, has_customized_qrange)
    return minmax_qparams(min_val, max_val, quant_min, quant_max, symmetric, zp, eps)


def float_qparams(
    min_val: Tensor, max_val: Tensor, quant_min: int, quant_max: int, eps: Tensor
) -> tuple[Tensor, Tensor]:
    """torch.ao's per_channel_affine_float_qparams branch of _calculate_qparams: the range is
    [min, max] itself (not widened to 0), scale = (max - min) / (qmax - qmin), 1.0 where it is
    not above eps, and the float zero point -min / scale (so q = rne(x / scale + zp))."""
    scale = _div(max_val - min_val, float(quant_max - quant_min))
    scale = torch.where(scale > eps, scale, torch.ones_like(scale))
    zero_point = -1 * min_val / scale
    return scale, zero_point


def symmetric_zero_point(
    quant_min: int, quant_max: int, dtype: torch.dtype, has_customized_qrange: bool
) -> int:
    """The fixed zero point of torch.ao's symmetric schemes for `dtype`."""
    if dtype in (torch.quint8, torch.uint8):
        return (quant_min + quant_max) // 2 if has_customized_qrange else 128
    if dtype == torch.uint16:
        return 2**15
    return 0


def fused_qparams(
    min_val: Tensor, max_val: Tensor, quant_min: int, quant_max: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """torch.fused_moving_avg_obs_fake_quant's qparams (ChooseQuantizationParams, CPU), elementwise.

    fp32 min/max in, fp32 scale and int32 zero point out, same shape. Each step rounds where
    the C++ does: float arithmetic as fp32, double as fp64. Found bit-exact with torch 2.13's
    CPU op (tests/test_fake_quantize.py) only with these two details: the scale is rounded to
    fp32 before the zero point is derived from it, and the zero point comes from the min when
    |qmin| + |min / scale| < |qmax| + |max / scale| (sums of magnitudes), else from the max."""
    f32, f64 = torch.float32, torch.float64
    mn = min_val.to(f32)
    mx = max_val.to(f32)
    qrange = quant_max - quant_min
    if symmetric:
        # preserve_sparsity: widen [min, max] to the symmetric range around 0.
        sym_min, sym_max = -(qrange // 2 + 1), qrange // 2
        straddles = (mn < 0) & (mx > 0)
        max_scale = torch.max(_div(mn, float(sym_min)).abs(), _div(mx, float(sym_max)).abs())
        max_scale = max_scale.to(f64)
        mn = torch.where(straddles, (max_scale * sym_min).to(f32), mn)
        mx = torch.where(straddles, (max_scale * sym_max).to(f32), mx)
    mn = torch.clamp(mn, max=0.0)
    mx = torch.clamp(mx, min=0.0)
    scale = _div(mx.to(f64) - mn.to(f64), float(qrange)).to(f32)
    # 0 or an infinite reciprocal: 0.1, as fbgemm precomputes 1 / scale.
    degenerate = (scale == 0) | torch.isinf(torch.ones_like(scale) / scale)
    scale = torch.where(degenerate, torch.full_like(scale, 0.1), scale)
    small = scale < SMALL_SCALE_THRESHOLD
    amplifier = torch.full_like(scale, SMALL_SCALE_THRESHOLD) / scale
    cut_max = torch.full_like(mx, SMALL_SCALE_THRESHOLD) * float(qrange)
    small_mn = torch.where(mx == 0, -cut_max, mn * amplifier)
    small_mx = torch.where(mx == 0, mx, mx * amplifier)
    small_mn = torch.where(mn == 0, mn, small_mn)
    small_mx = torch.where(mn == 0, cut_max, small_mx)
    mn = torch.where(small, small_mn, mn)
    mx = torch.where(small, small_mx, mx)
    scale = torch.where(small, torch.full_like(scale, SMALL_SCALE_THRESHOLD), scale)
    # Zero point from the min or the max, whichever adds the smaller terms.
    scale64 = scale.to(f64)
    rmin = mn.to(f64) / scale64
    rmax = mx.to(f64) / scale64
    from_min_error = abs(quant_min) + rmin.abs()
    from_max_error = abs(quant_max) + rmax.abs()
    initial = torch.where(from_min_error < from_max_error, quant_min - rmin, quant_max - rmax)
    if symmetric:
        mid = torch.full_like(initial, (quant_min + quant_max) / 2)
        initial = torch.where((mn < 0) & (mx > 0), mid, initial)
    nudged = torch.round(initial).clamp(quant_min, quant_max)
    return scale, nudged.to(torch.int32)


def check_min_max_valid(min_val: Tensor, max_val: Tensor) -> bool:
    """torch.ao.quantization.utils.check_min_max_valid (warnings and checks alike)."""
    msg = "must run observer before calling calculate_qparams. Returning default values."
    if min_val.numel() == 0 or max_val.numel() == 0:
        warnings.warn(msg, stacklevel=3)
        return False
    if min_val.dim() == 0 or max_val.dim() == 0:
        if min_val == float("inf") and max_val == float("-inf"):
            warnings.warn(msg, stacklevel=3)
            return False
        if min_val > max_val:
            raise ValueError(f"min {min_val} should be less than max {max_val}")
    elif torch.any(min_val > max_val):
        raise ValueError(f"min {min_val} should be less than max {max_val}")
    return True


# --- input quantizers of the integer GEMMs ----------------------------------------------------


def per_token_spec(
    quant_min: int, quant_max: int, qscheme: torch.qscheme, dtype: torch.dtype, eps: float
) -> PerTokenQParams:
    """The dynamic per-token quantizer for torch.ao's (quant_min, quant_max, qscheme, dtype)."""
    custom = (quant_min, quant_max) != dtype_range(dtype)
    return PerTokenQParams(
        quant_min,
        quant_max,
        symmetric=qscheme in SYMMETRIC_SCHEMES,
        symmetric_zero_point=symmetric_zero_point(quant_min, quant_max, dtype, custom),
        eps=eps,
    )


def row_quant(
    quant_min: int,
    quant_max: int,
    qscheme: torch.qscheme = torch.per_tensor_symmetric,
    dtype: torch.dtype = torch.qint8,
    eps: float = float(torch.finfo(torch.float32).eps),
) -> RowQuant:
    """The dynamic per-token quantizer of triton_qat.quantizers.fake_quantize_per_token."""
    check_quant_range(quant_min, quant_max)
    if quant_max - quant_min > 255:
        raise ValueError(
            f"8-bit codes need quant_max - quant_min <= 255, got {quant_max - quant_min}"
        )
    spec = per_token_spec(quant_min, quant_max, qscheme, dtype, float(eps))
    return RowQuant(quant_min, quant_max, spec.symmetric, spec.symmetric_zero_point, spec.eps)


def static_row_quant(scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int) -> RowQuant:
    """A static per-tensor input quantizer (one scale and zero point for every row)."""
    check_quant_range(quant_min, quant_max)
    if quant_max - quant_min > 255:
        raise ValueError(
            f"8-bit codes need quant_max - quant_min <= 255, got {quant_max - quant_min}"
        )
    if scale.numel() != 1 or zero_point.numel() != 1:
        raise ValueError("static input qparams must be per tensor (one scale, one zero point)")
    if zero_point.is_floating_point():
        raise TypeError(f"zero_point must be an integer tensor, got {zero_point.dtype}")
    return RowQuant(
        quant_min,
        quant_max,
        scale=scale.detach().reshape(1).to(torch.float32).contiguous(),
        zero_point=zero_point.detach().reshape(1).to(torch.int32).contiguous(),
    )
