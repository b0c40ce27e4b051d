"""Checks of the fake-quant kernels, of the reference against torch, and of the LSQ kernels."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import triton_qat as tq
from triton_qat.numerics import reference
from triton_qat.numerics.qparams import QParams, normalize
from triton_qat.ops import functional as ops
from triton_qat.tools.check.common import (
    DTYPE_NAMES,
    DTYPES,
    QUANT_RANGES,
    CheckResult,
    _bit_exact_row,
    _fq_input,
    _gen,
    _scales,
    _zero_points,
)

# --- fake quant cases --------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeQuantCase:
    """One fake-quant comparison: granularity, input shape, dtype, range and zero-point kind."""

    granularity: str  # "per_tensor", "per_channel" or "per_group"
    shape: tuple[int, ...]
    dtype: torch.dtype
    qrange: tuple[str, int, int]  # (name, quant_min, quant_max)
    float_zp: bool = False
    axis: int | None = None
    group_size: int | None = None

    @property
    def label(self) -> str:
        if self.granularity == "per_channel":
            gran = f"per_channel(axis={self.axis})"
        elif self.granularity == "per_group":
            gran = f"per_group({self.group_size})"
        else:
            gran = "per_tensor"
        return f"{gran} {self.qrange[0]} zp={'float' if self.float_zp else 'int'}"


def _granularities(size: str) -> list[tuple[str, tuple[int, ...], int | None, int | None]]:
    """(granularity, shape, axis, group_size); tiny and medium extents are odd where the
    group size allows (no multiple of a block)."""
    if size == "tiny":
        return [
            ("per_tensor", (37, 67), None, None),
            ("per_channel", (5, 7, 33), 0, None),
            ("per_channel", (5, 7, 33), -1, None),
            ("per_group", (9, 96), None, 32),
            ("per_group", (5, 256), None, 128),
            ("per_group", (7, 189), None, 63),
        ]
    if size == "medium":
        return [
            ("per_tensor", (255, 257), None, None),
            ("per_channel", (9, 31, 129), 0, None),
            ("per_channel", (9, 31, 129), -1, None),
            ("per_group", (129, 256), None, 32),
            ("per_group", (65, 384), None, 128),
            ("per_group", (127, 252), None, 63),
        ]
    big = (4096, 4096)
    return [
        ("per_tensor", big, None, None),
        ("per_channel", big, 0, None),
        ("per_channel", big, -1, None),
        ("per_group", big, None, 32),
        ("per_group", big, None, 128),
        ("per_group", (4096, 4095), None, 63),
    ]


def fake_quant_cases(size: str) -> list[FakeQuantCase]:
    """The fake-quant grid: granularities x dtypes x ranges x zero-point kinds."""
    cases = []
    for gran, shape, axis, group in _granularities(size):
        for dtype in DTYPES:
            for qrange in QUANT_RANGES:
                # A float zero point exists per channel and per group only (as in torch).
                for float_zp in (False,) if gran == "per_tensor" else (False, True):
                    cases.append(FakeQuantCase(gran, shape, dtype, qrange, float_zp, axis, group))
    return cases


def _case_qparams(case: FakeQuantCase, device: str, gen: torch.Generator):
    """(QParams, per-element scale, per-element zero point) of a fake-quant case."""
    _, qmin, qmax = case.qrange
    shape = case.shape
    if case.granularity == "per_tensor":
        scale, zp = 2.0**-5, (3 * qmin + 5 * qmax) // 8
        qp = QParams(scale, zp, qmin, qmax)
        full_scale = torch.full(shape, scale, device=device)
        return qp, full_scale, torch.full(shape, float(zp), device=device)
    if case.granularity == "per_channel":
        axis = case.axis % len(shape)
        pshape = (shape[axis],)
        view = [1] * len(shape)
        view[axis] = -1
    else:
        axis = None
        pshape = (*shape[:-1], shape[-1] // case.group_size)
    scale = _scales(pshape, gen, device)
    zp = _zero_points(pshape, qmin, qmax, case.float_zp, gen, device)
    if axis is not None:
        qp = QParams(scale, zp, qmin, qmax, axis=case.axis)
        return qp, scale.reshape(view).expand(shape), zp.float().reshape(view).expand(shape)
    qp = QParams(scale, zp, qmin, qmax, group_size=case.group_size)
    g = case.group_size
    return qp, scale.repeat_interleave(g, dim=-1), zp.float().repeat_interleave(g, dim=-1)


def _public_op(qp: QParams) -> Callable[[Tensor], Tensor]:
    if qp.granularity == "per_tensor":
        return lambda t: tq.fake_quantize_per_tensor(
            t, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max
        )
    if qp.granularity == "per_channel":
        return lambda t: tq.fake_quantize_per_channel(
            t, qp.scale, qp.zero_point, qp.axis, qp.quant_min, qp.quant_max
        )
    return lambda t: tq.fake_quantize_per_group(
        t, qp.scale, qp.zero_point, qp.group_size, qp.quant_min, qp.quant_max
    )


def _forward_backward(fn, x: Tensor, dy: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    xi = x.detach().clone().requires_grad_()
    with tq.use_backend(backend):
        y = fn(xi)
        y.backward(dy)
    return y.detach(), xi.grad


def _grad_output(shape, dtype, gen, device) -> Tensor:
    dy = torch.randn(shape, generator=gen, device=device).to(dtype)
    if dy.numel() > 1:
        dy.view(-1)[1] = float("nan")  # NaN * 0 stays NaN where clamped, as in torch
    return dy


def check_fake_quant(case: FakeQuantCase, device: str, seed: int = 0) -> list[CheckResult]:
    """Kernel ("triton") vs reference ("eager"): forward y and input gradient dx, bit for bit."""
    gen = _gen(device, seed)
    qp, scale_full, zp_full = _case_qparams(case, device, gen)
    _, qmin, qmax = case.qrange
    x = _fq_input(scale_full, zp_full, qmin, qmax, case.dtype, gen, specials=True)
    dy = _grad_output(case.shape, case.dtype, gen, device)
    fn = _public_op(qp)
    y_t, dx_t = _forward_backward(fn, x, dy, "triton")
    y_e, dx_e = _forward_backward(fn, x, dy, "eager")
    args = ("fake_quant", case.label, case.shape, DTYPE_NAMES[case.dtype])
    return [_bit_exact_row(*args, "y", y_t, y_e), _bit_exact_row(*args, "dx", dx_t, dx_e)]


# --- reference vs torch ----------------------------------------------------------------------


def reference_cases(size: str) -> list[FakeQuantCase]:
    """Reference vs torch's CPU ops: integer zero points, per tensor / channel / group."""
    shape = (37, 96) if size == "tiny" else (512, 1024)
    grans = [
        ("per_tensor", None, None),
        ("per_channel", 0, None),
        ("per_channel", -1, None),
        ("per_group", None, 32),
    ]
    return [
        FakeQuantCase(gran, shape, dtype, qrange, False, axis, group)
        for gran, axis, group in grans
        for dtype in DTYPES
        for qrange in QUANT_RANGES
    ]


def _torch_fake_quant(x: Tensor, qp: QParams) -> Tensor:
    if qp.granularity == "per_tensor":
        return torch.fake_quantize_per_tensor_affine(
            x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max
        )
    if qp.granularity == "per_channel":
        return torch.fake_quantize_per_channel_affine(
            x, qp.scale, qp.zero_point, qp.axis % x.dim(), qp.quant_min, qp.quant_max
        )
    # Per group = per channel over the (-1, group) view, one parameter per row.
    g = qp.group_size
    y = torch.fake_quantize_per_channel_affine(
        x.reshape(-1, g),
        qp.scale.reshape(-1),
        qp.zero_point.reshape(-1),
        0,
        qp.quant_min,
        qp.quant_max,
    )
    return y.reshape(x.shape)


def check_reference_vs_torch(case: FakeQuantCase, seed: int = 0) -> list[CheckResult]:
    """triton_qat.numerics.reference vs torch's fake-quant ops on the CPU, forward and gradient."""
    gen = _gen("cpu", seed)
    qp, scale_full, zp_full = _case_qparams(case, "cpu", gen)
    _, qmin, qmax = case.qrange
    x = _fq_input(scale_full, zp_full, qmin, qmax, case.dtype, gen, specials=False)
    dy = torch.randn(case.shape, generator=gen).to(case.dtype)
    nq = normalize(x, qp)
    y_ref = reference.fake_quantize_ref(x, nq)
    dx_ref = reference.fake_quantize_backward_ref(x, dy, nq)
    xi = x.clone().requires_grad_()
    y_torch = _torch_fake_quant(xi, qp)
    y_torch.backward(dy)
    args = ("reference_vs_torch", case.label, case.shape, DTYPE_NAMES[case.dtype])
    return [
        _bit_exact_row(*args, "y", y_ref, y_torch.detach()),
        _bit_exact_row(*args, "dx", dx_ref, xi.grad),
    ]


# --- learnable qparams (LSQ) -------------------------------------------------------------------

FP32_UNIT_ROUNDOFF = 2.0**-24
# The learnable ops' grad_factor in the check: not a power of two, so its rounding shows.
_LEARNABLE_GRAD_FACTOR = 0.3


def learnable_cases(size: str) -> list[FakeQuantCase]:
    """Per tensor and per channel (axis 0, last axis) x fp32 / bf16 x int8 (and uint8 beyond
    the quick grid)."""
    cases = []
    for gran, shape, axis, _ in _granularities(size)[:3]:
        for dtype in (torch.float32, torch.bfloat16):
            for qrange in QUANT_RANGES[: 1 if size == "tiny" else 2]:
                cases.append(FakeQuantCase(gran, shape, dtype, qrange, True, axis))
    return cases


def _learnable_qparams(case: FakeQuantCase, device: str, gen: torch.Generator):
    """(scale, float zero point) of shape (1,) or (channels,); every other zero point on a
    half, where the forward's and the per-tensor backward's roundings differ."""
    _, qmin, qmax = case.qrange
    n = 1 if case.axis is None else case.shape[case.axis]
    scale = _scales((n,), gen, device)
    zp = _zero_points((n,), qmin, qmax, True, gen, device)
    even = torch.arange(n, device=device) % 2 == 0
    return scale, torch.where(even, zp.floor() + 0.5, zp)


def learnable_grads(x, dy, scale, zero_point, axis, qmin, qmax, grad_factor, backend):
    """(y, dx, dscale, dzp) of the learnable op (per tensor when axis is None) on `backend`."""
    xi, si, zi = (t.detach().clone().requires_grad_() for t in (x, scale, zero_point))
    with tq.use_backend(backend):
        if axis is None:
            y = ops.fake_quantize_learnable(xi, si, zi, qmin, qmax, grad_factor)
        else:
            y = ops.fake_quantize_learnable_per_channel(xi, si, zi, axis, qmin, qmax, grad_factor)
        y.backward(dy)
    return y.detach(), xi.grad, si.grad, zi.grad


def summation_error(got: Tensor, terms: Tensor, dims: list[int]) -> tuple[float, float]:
    """(max over channels of |got - exact| / sum|terms|, (n - 1) * 2**-24): got, an fp32 sum of
    the fp32 `terms` over `dims` in any order, is within the second of the exact (float64)
    sum (Higham, Accuracy and Stability of Numerical Algorithms, eq. 4.4)."""
    n = math.prod(terms.shape[d] for d in dims)
    exact = terms.double().sum(dims).reshape(-1)
    magnitude = terms.double().abs().sum(dims).reshape(-1)
    err = (got.detach().double().cpu().reshape(-1) - exact.cpu()).abs()
    rel = torch.where(magnitude > 0, err / magnitude, err)  # no terms: any error is one
    return float(rel.max()) if rel.numel() else 0.0, (n - 1) * FP32_UNIT_ROUNDOFF


def check_learnable(case: FakeQuantCase, device: str, seed: int = 0) -> list[CheckResult]:
    """Learnable kernels vs reference: y and dx bit for bit, dscale and dzp within the
    summation-order bound of the exact sum of the reference's per-element terms."""
    gen = _gen(device, seed)
    _, qmin, qmax = case.qrange
    scale, zp = _learnable_qparams(case, device, gen)
    view = [1] * len(case.shape)
    if case.axis is not None:
        view[case.axis] = -1
    zp_fwd = reference.learnable_zero_point(zp, qmin, qmax, trunc=False)
    full = [t.reshape(view).expand(case.shape) for t in (scale, zp_fwd)]
    x = _fq_input(*full, qmin, qmax, case.dtype, gen, specials=False)
    dy = torch.randn(case.shape, generator=gen, device=device).to(case.dtype)
    gf = _LEARNABLE_GRAD_FACTOR
    got = learnable_grads(x, dy, scale, zp, case.axis, qmin, qmax, gf, "triton")
    want = learnable_grads(x, dy, scale, zp, case.axis, qmin, qmax, gf, "eager")
    args = ("learnable", case.label, case.shape, DTYPE_NAMES[case.dtype])
    rows = [
        _bit_exact_row(*args, "y", got[0], want[0]),
        _bit_exact_row(*args, "dx", got[1], want[1]),
    ]
    nq = ops.learnable_backward_norm(x, scale, zp, qmin, qmax, case.axis)
    _, ds_terms, dz_terms = reference.learnable_grad_terms_ref(x, dy, nq, gf)
    dims = reference.learnable_reduce_dims(x.shape, case.axis)
    for metric, grad, terms in (("dscale", got[2], ds_terms), ("dzp", got[3], dz_terms)):
        rel, bound = summation_error(grad, terms, dims)
        passed = rel <= bound
        result = f"rel err {rel:.2e} {'<=' if passed else '>'} bound {bound:.2e}"
        rows.append(CheckResult(*args, metric, result, passed, tolerance=bound, rel_err=rel))
    return rows
