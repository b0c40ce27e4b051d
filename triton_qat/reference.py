"""The eager oracle: fake quantization in plain PyTorch (semantics: NUMERICS.md).

Bit-exact with torch.fake_quantize_per_tensor_affine / _per_channel_affine on the CPU, and
the same function on every device. Every Triton kernel is tested against this module.

One deliberate difference from torch: torch's CPU per-channel op casts to int64 before it
clamps, so values with |x / scale| >= 2**63 (and +inf) wrap to quant_min there; here, as in
torch's per-tensor op, they saturate to quant_max.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton_qat.qparams import NormQParams


def reciprocal(scale: Tensor) -> Tensor:
    """fp32 1 / scale, the multiplier torch uses (x * (1/scale), never x / scale)."""
    return torch.reciprocal(scale.to(torch.float32))


def quantize_unclamped(
    xf: Tensor, inv_scale: Tensor, zero_point: Tensor, float_zero_point: bool
) -> Tensor:
    """Integer-valued fp32 q before clamping.

    Integer zero point: q = rne(x * inv) + zp, added after rounding.
    Float zero point (per channel / group): q = rne(zp + x * inv), added before rounding.
    """
    zp = zero_point.to(torch.float32)
    v = xf * inv_scale
    return torch.round(v + zp) if float_zero_point else torch.round(v) + zp


def straight_through_mask(qf: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """quant_min <= q <= quant_max, taken before clamping (False for NaN)."""
    return (qf >= quant_min) & (qf <= quant_max)


def fake_quant_core(
    xf: Tensor,
    inv_scale: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    float_zero_point: bool,
) -> tuple[Tensor, Tensor]:
    """fp32 fake quant of fp32 `xf` with broadcastable qparams: (y_fp32, mask).

    NaN lands on quant_min (fmax(NaN, qmin) = qmin), +-inf on the range ends.
    With a float zero point torch dequantizes in float64, (q - zp) * scale, then rounds to
    fp32; with an integer one that product is exact either way.
    """
    qf = quantize_unclamped(xf, inv_scale, zero_point, float_zero_point)
    mask = straight_through_mask(qf, quant_min, quant_max)
    q = torch.fmin(torch.fmax(qf, qf.new_tensor(float(quant_min))), qf.new_tensor(float(quant_max)))
    if float_zero_point:
        y = ((q.double() - zero_point.double()) * scale.double()).float()
    else:
        y = (q - zero_point.to(torch.float32)) * scale
    return y, mask


def _param_view(nq: NormQParams, t: Tensor) -> Tensor:
    return t.view(1, -1) if nq.params_on_cols else t.view(1, -1, 1)


def _x_view(nq: NormQParams, x: Tensor) -> Tensor:
    if nq.params_on_cols:
        return x.reshape(nq.rows, nq.cols)
    return x.reshape(-1, nq.channels, nq.cols)


def fake_quantize_ref(x: Tensor, nq: NormQParams) -> Tensor:
    """Fake-quantized x, same dtype and shape as x (computed in fp32, cast once)."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    y, _ = fake_quant_core(
        _x_view(nq, x).to(torch.float32),
        _param_view(nq, reciprocal(nq.scale)),
        _param_view(nq, nq.scale),
        _param_view(nq, nq.zero_point),
        nq.quant_min,
        nq.quant_max,
        nq.float_zero_point,
    )
    return y.to(x.dtype).reshape(x.shape)


def fake_quantize_mask_ref(x: Tensor, nq: NormQParams, inv_scale: Tensor | None = None) -> Tensor:
    """Boolean straight-through mask of x (True where x was not clamped).

    `inv_scale` (1 / scale, as computed at forward time) replaces nq.scale when given.
    """
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.bool, device=x.device)
    inv = reciprocal(nq.scale) if inv_scale is None else inv_scale
    qf = quantize_unclamped(
        _x_view(nq, x).to(torch.float32),
        _param_view(nq, inv),
        _param_view(nq, nq.zero_point),
        nq.float_zero_point,
    )
    return straight_through_mask(qf, nq.quant_min, nq.quant_max).reshape(x.shape)


def fake_quantize_backward_ref(
    x: Tensor, grad_y: Tensor, nq: NormQParams, inv_scale: Tensor | None = None
) -> Tensor:
    """Straight-through gradient: grad_y * mask, in grad_y's dtype (as torch: NaN * 0 is NaN)."""
    return grad_y * fake_quantize_mask_ref(x, nq, inv_scale)
