"""The eager oracle: fake quantization in plain PyTorch (semantics: NUMERICS.md).

Bit-exact with torch.fake_quantize_per_tensor_affine / _per_channel_affine on the CPU, and
the same function on every device. Every Triton kernel is tested against this module.

One deliberate difference from torch: torch's CPU per-channel op casts to int64 before it
clamps, so values with |x / scale| >= 2**63 (and +inf) wrap to quant_min there; here, as in
torch's per-tensor op, they saturate to quant_max.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from triton_qat.numerics.qparams import LinearQuant, NormQParams


def reciprocal(scale: Tensor) -> Tensor:
    """fp32 1 / scale, the multiplier torch uses (x * (1/scale), never x / scale)."""
    return torch.reciprocal(scale.to(torch.float32))


def fma_fp32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """fp32 a * b + c with a single rounding, exactly (as a hardware FMA).

    The product is exact in float64; the float64 sum may round, and when that rounding lands
    exactly halfway between two fp32 values, the sum's exact error (TwoSum) decides the side.
    """
    p = a.double() * b.double()
    cd = c.double()
    s = p + cd
    t = s - cd
    err = (p - t) + (cd - (s - t))
    f = s.float()
    above = s > f.double()
    other = torch.where(
        above,
        torch.nextafter(f, f.new_tensor(float("inf"))),
        torch.nextafter(f, f.new_tensor(float("-inf"))),
    )
    halfway = s == (f.double() + other.double()) * 0.5
    # Halfway in float64 only: the exact sum lies on the side of err.
    take_other = halfway & (err != 0) & ((err > 0) == above)
    # An infinite product or addend: no error term to speak of, the sum is what it is.
    exact = torch.isinf(p) | torch.isinf(cd)
    return torch.where(take_other & ~exact, other, f)


def quantize_unclamped(
    xf: Tensor, inv_scale: Tensor, zero_point: Tensor, float_zero_point: bool
) -> Tensor:
    """Integer-valued fp32 q before clamping.

    Integer zero point: q = rne(x * inv) + zp, added after rounding.
    Float zero point (per channel / group): q = rne(fma(x, inv, zp)), added before rounding
    in one fused multiply-add, as torch's vectorized CPU kernel (AVX2 / AVX-512 builds) and
    its CUDA kernel compute it; `+ 0.0` turns -0.0 into +0.0 as torch's integer q does.
    """
    zp = zero_point.to(torch.float32)
    if float_zero_point:
        xb, ib, zb = torch.broadcast_tensors(xf, inv_scale, zp)
        return torch.round(fma_fp32(xb, ib, zb)) + 0.0
    return torch.round(xf * inv_scale) + zp


def straight_through_mask(qf: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """quant_min <= q <= quant_max, taken before clamping (False for NaN)."""
    return (qf >= quant_min) & (qf <= quant_max)


def clamp_quantized(qf: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """fmin(fmax(q, quant_min), quant_max): NaN lands on quant_min, as in torch."""
    return torch.fmin(
        torch.fmax(qf, qf.new_tensor(float(quant_min))), qf.new_tensor(float(quant_max))
    )


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
    q = clamp_quantized(qf, quant_min, quant_max)
    if float_zero_point:
        y = ((q.double() - zero_point.double()) * scale.double()).float()
    else:
        y = (q - zero_point.to(torch.float32)) * scale
    return y, mask


# --- qparams from min / max (NUMERICS.md, "Observers") ---------------------------------------


def divide_fp32(t: Tensor, divisor: float) -> Tensor:
    """t / divisor, rounded once in t's dtype on every device.

    torch's CPU kernels divide by a Python number; its CUDA kernels multiply by its reciprocal
    instead. A divisor tensor on t's device is a true division on both."""
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def minmax_qparams(
    min_val: Tensor,
    max_val: Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    symmetric_zero_point: int,
    eps: Tensor,
) -> tuple[Tensor, Tensor]:
    """torch.ao's UniformQuantizationObserverBase._calculate_qparams, after its validity check.

    Shapes follow min_val broadcast against eps (shape (1,)); zero point dtype as torch.ao:
    int64 (all `symmetric_zero_point`) for symmetric schemes, int32 for affine ones."""
    min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
    if symmetric:
        max_val_pos = torch.max(-min_val_neg, max_val_pos)
        scale = divide_fp32(max_val_pos, float(quant_max - quant_min) / 2)
        scale = torch.max(scale, eps)
        zero_point = torch.full(
            min_val_neg.size(), symmetric_zero_point, dtype=torch.int64, device=min_val.device
        )
    else:
        scale = divide_fp32(max_val_pos - min_val_neg, float(quant_max - quant_min))
        scale = torch.max(scale, eps)
        zero_point = quant_min - torch.round(min_val_neg / scale).to(torch.int)
        zero_point = torch.clamp(zero_point, quant_min, quant_max)
    return scale, zero_point


def per_token_qparams_ref(
    x2d: Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    symmetric_zero_point: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(scale fp32 (M,), zero point int32 (M,)) of each row of x2d (M, K) from its own
    min / max (fp32, NaN propagating), with minmax_qparams.

    An affine row holding NaN or +-inf (or a zero scale, eps = 0) has min / scale = NaN, whose
    conversion to int is platform-defined in torch (INT_MIN on x86, 0 on CUDA and ARM): its
    zero point is defined here as quant_min, the value of a zero rounding, on every device.
    With it such a row fake-quantizes to all NaN (its scale is NaN or inf)."""
    m, k = x2d.shape
    if k:
        # amin and amax: the values of aminmax, which is several times slower along dim 1 on CPUs.
        lo, hi = x2d.detach().amin(dim=1), x2d.detach().amax(dim=1)
    else:
        lo = hi = torch.zeros(m, dtype=torch.float32, device=x2d.device)
    return per_token_qparams_from_minmax(
        lo, hi, quant_min, quant_max, symmetric, symmetric_zero_point, eps
    )


def per_token_qparams_from_minmax(
    lo: Tensor,
    hi: Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    symmetric_zero_point: int,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """per_token_qparams_ref from each row's min `lo` and max `hi` ((M,) each)."""
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    eps_t = torch.tensor([eps], dtype=torch.float32, device=lo.device)
    scale, zero_point = minmax_qparams(
        lo, hi, quant_min, quant_max, symmetric, symmetric_zero_point, eps_t
    )
    if not symmetric:
        defined = torch.isfinite(lo) & torch.isfinite(hi) & (scale != 0)
        zero_point = torch.where(defined, zero_point, torch.full_like(zero_point, quant_min))
    return scale.reshape(-1), zero_point.reshape(-1).to(torch.int32)


# --- fake quantization -----------------------------------------------------------------------


def fake_quantize_rows_fp32(
    x2d: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int
) -> Tensor:
    """fp32 fake quant of each row of x2d (M, K) with its own scale and integer zero point
    ((M,) each): fake_quant_core's values without its mask, computed in one new buffer,
    in place (the inference path of a dynamic per-token input; tests compare the two)."""
    zp = zero_point.to(torch.float32).view(-1, 1)
    q = x2d.to(torch.float32) * reciprocal(scale).view(-1, 1)
    q.round_().add_(zp)
    # clamp_quantized in place (NaN to quant_min, as its fmax / fmin do, which are far
    # slower here than clamp_ and nan_to_num_).
    q.clamp_(quant_min, quant_max).nan_to_num_(nan=float(quant_min))
    return q.sub_(zp).mul_(scale.to(torch.float32).view(-1, 1))


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


def quantized_codes_ref(x: Tensor, nq: NormQParams) -> Tensor:
    """The integer codes clamp(q) behind fake_quantize_ref(x, nq), as int32, shaped as x."""
    qf = quantize_unclamped(
        _x_view(nq, x).to(torch.float32),
        _param_view(nq, reciprocal(nq.scale)),
        _param_view(nq, nq.zero_point),
        nq.float_zero_point,
    )
    return clamp_quantized(qf, nq.quant_min, nq.quant_max).to(torch.int32).reshape(x.shape)


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


def fake_quantize_with_mask_ref(
    x: Tensor, nq: NormQParams, inv_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(fake-quantized x, straight-through mask), both shaped as x."""
    return fake_quantize_ref(x, nq), fake_quantize_mask_ref(x, nq, inv_scale)


FakeQuantWithMask = Callable[[Tensor, NormQParams, "Tensor | None"], tuple[Tensor, Tensor]]


class LinearOperands(NamedTuple):
    """The fake-quantized operands of a linear and their straight-through masks."""

    xq: Tensor  # fq(x) (or x), input dtype
    mask_x: Tensor | None  # None when the input is not fake-quantized
    wq: Tensor  # fq(weight).to(input dtype)
    mask_w: Tensor


def fq_linear_operands(
    x: Tensor,
    weight: Tensor,
    lq: LinearQuant,
    fake_quant: FakeQuantWithMask = fake_quantize_with_mask_ref,
) -> LinearOperands:
    """fq_x(x), fq_w(weight) cast to x's dtype, and both masks.

    `fake_quant` computes (fq(t), mask(t)); any implementation equal to
    fake_quantize_with_mask_ref may stand in (ops.py passes torch's fused CPU op).
    """
    xq, mask_x = fake_quant(x, lq.input_norm(x), lq.x_inv) if lq.x_fq else (x, None)
    wq, mask_w = fake_quant(weight, lq.weight_norm(weight), lq.w_inv)
    return LinearOperands(xq, mask_x, wq.to(x.dtype), mask_w)


def linear_of_operands(ops: LinearOperands, bias: Tensor | None) -> Tensor:
    """F.linear(fq_x(x), fq_w(w), bias), bias cast to the input dtype as F.linear needs."""
    b = None if bias is None else bias.to(ops.xq.dtype)
    return torch.nn.functional.linear(ops.xq, ops.wq, b)


def linear_grads_of_operands(
    grad_y: Tensor, ops: LinearOperands, weight_dtype: torch.dtype, need_dx: bool, need_dw: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Straight-through gradients, as autograd of the eager composition:
    dx = (dy @ fq_w(w)) * mask_x(x); dw = (dy^T @ fq_x(x)).to(w.dtype) * mask_w(w)."""
    dx = dw = None
    if need_dx:
        dx = grad_y @ ops.wq
        if ops.mask_x is not None:
            dx = dx * ops.mask_x
    if need_dw:
        dw = (grad_y.t() @ ops.xq).to(weight_dtype) * ops.mask_w
    return dx, dw


def fq_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lq: LinearQuant,
    fake_quant: FakeQuantWithMask = fake_quantize_with_mask_ref,
) -> Tensor:
    """F.linear(fq_x(x), fq_w(weight).to(x.dtype), bias): x (M, K), weight (N, K)."""
    return linear_of_operands(fq_linear_operands(x, weight, lq, fake_quant), bias)


def fq_linear_backward_ref(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lq: LinearQuant,
    need_dx: bool,
    need_dw: bool,
    fake_quant: FakeQuantWithMask = fake_quantize_with_mask_ref,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of fq_linear_ref, the operands recomputed from x and weight."""
    ops = fq_linear_operands(x, weight, lq, fake_quant)
    return linear_grads_of_operands(grad_y, ops, weight.dtype, need_dx, need_dw)


# --- learnable scale / zero point (LSQ) ---------------------------------------------------------


def learnable_zero_point(zero_point: Tensor, quant_min: int, quant_max: int, trunc: bool) -> Tensor:
    """The integer-valued fp32 zero point torch's learnable ops use for a float `zero_point`.

    clamp(rne(zp), qmin, qmax) in every forward and in the per-channel backward; torch's
    per-tensor backward instead truncates: trunc(clamp(zp + 0.5, qmin, qmax)) (`trunc` True),
    which differs at negative halves and below -0.5 (zp = -1.5 -> -1, -0.7 -> 0).
    """
    zp = zero_point.detach().to(torch.float32)
    if trunc:
        return clamp_quantized(zp + 0.5, quant_min, quant_max).trunc()
    return clamp_quantized(torch.round(zp), quant_min, quant_max)


def learnable_grad_terms_ref(
    x: Tensor, grad_y: Tensor, nq: NormQParams, grad_factor: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-element gradients of torch._fake_quantize_learnable_per_*_affine: (dx, dscale_terms,
    dzp_terms), each shaped as x; dx in grad_y's dtype, the terms in fp32.

    nq.zero_point holds the backward's integer-valued fp32 zero point (learnable_zero_point).
    As torch's CPU kernel (AVX2 / AVX-512 builds) computes them, with one fp32 rounding per
    operation and two fused multiply-adds:
        xq = rne(fma(x, inv, zp))                         (zp added before rounding)
        dx = dy * [qmin <= xq <= qmax]
        dscale = gf * (xq < qmin ? dy * (qmin - zp) : xq > qmax ? dy * (qmax - zp)
                                 : (dy * fma(clamp(xq) - zp, scale, -x)) * inv)
        dzp    = gf * (saturated ? -dy * scale : 0)
    NaN counts as below quant_min, as torch's int64 conversion makes it; +inf as above
    quant_max (torch's conversion sends it below: the forward's saturation is kept instead).
    """
    shape = x.shape
    xf = _x_view(nq, x).to(torch.float32)
    dy = _x_view(nq, grad_y).to(torch.float32)
    scale = _param_view(nq, nq.scale)
    inv = _param_view(nq, reciprocal(nq.scale))
    zp = _param_view(nq, nq.zero_point.to(torch.float32))
    gf = torch.tensor(grad_factor, dtype=torch.float32, device=x.device)
    xq = quantize_unclamped(xf, inv, zp, float_zero_point=True)
    keep = straight_through_mask(xq, nq.quant_min, nq.quant_max)
    below = ~(xq >= nq.quant_min)
    q = clamp_quantized(xq, nq.quant_min, nq.quant_max)
    q_minus_zp, scale_b, x_b = torch.broadcast_tensors(q - zp, scale, xf)
    in_range = (dy * fma_fp32(q_minus_zp, scale_b, -x_b)) * inv
    saturated = torch.where(below, dy * (nq.quant_min - zp), dy * (nq.quant_max - zp))
    dscale = torch.where(keep, in_range, saturated) * gf
    dzp = torch.where(keep, torch.zeros_like(dy), (dy * -scale) * gf)
    dx = grad_y * keep.reshape(shape)
    return dx, dscale.reshape(shape), dzp.reshape(shape)


def learnable_reduce_dims(shape: torch.Size, axis: int | None) -> list[int]:
    """The dims torch's learnable ops sum the per-element qparam gradients over."""
    if axis is None:
        return list(range(len(shape)))
    return [d for d in range(len(shape)) if d != axis % len(shape)]


def fake_quantize_learnable_backward_ref(
    x: Tensor, grad_y: Tensor, nq: NormQParams, axis: int | None, grad_factor: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dscale, dzp) of the learnable fake quant: the per-element terms summed as torch
    sums them (over the whole tensor, or over every dim but `axis`); dscale and dzp have
    nq.scale's shape (channels,)."""
    dx, ds, dz = learnable_grad_terms_ref(x, grad_y, nq, grad_factor)
    dims = learnable_reduce_dims(x.shape, axis)
    return dx, ds.sum(dims).reshape(-1), dz.sum(dims).reshape(-1)
