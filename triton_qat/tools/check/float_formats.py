"""Checks of the float-format kernels (FP8, MXFP8 / MXFP4, NVFP4): the standalone fake quant
bit for bit against the reference, and the fused linears (tq.fp8_linear, tq.mx_linear)
against their eager composition and a float64 product of the same fake-quantized operands."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

import triton_qat as tq
from triton_qat.numerics.float_formats import fake_quantize_float8_dynamic_ref, float8_format
from triton_qat.numerics.microscaling import (
    fake_quantize_mx_ref,
    fake_quantize_nvfp4_ref,
    mx_format,
)
from triton_qat.ops.float_formats import _float8_triton
from triton_qat.tools.check.common import (
    DTYPE_NAMES,
    DTYPES,
    CheckResult,
    _bit_exact_row,
    _gen,
    _linear_row,
)

KIND = "float_formats"
# (format, granularity / block size): FP8 per tensor and per row; MX blocks of 32; NVFP4 16.
FAKE_QUANT_SCHEMES = (
    ("float8_e4m3fn", "per_tensor"),
    ("float8_e4m3fn", "per_row"),
    ("float8_e5m2", "per_row"),
    ("mxfp8", 32),
    ("mxfp4", 32),
    ("nvfp4", 16),
)
# The fused linears: (weight format, input format or None); FP8 weights per row, inputs per
# token, MX / NVFP4 both operands per block.
LINEAR_SCHEMES = (
    ("float8_e4m3fn", "float8_e4m3fn"),
    ("float8_e4m3fn", None),
    ("mxfp8", "mxfp8"),
    ("mxfp4", "mxfp4"),
    ("nvfp4", "nvfp4"),
    ("nvfp4", None),
)


def _block(fmt: str) -> int:
    return 16 if fmt == "nvfp4" else 32


@dataclass(frozen=True)
class FloatFakeQuantCase:
    fmt: str
    granularity: str | int  # FP8: "per_tensor" / "per_row"; MX / NVFP4: the block size
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def label(self) -> str:
        if self.fmt.startswith("float8"):
            return f"{self.fmt.removeprefix('float8_')} {self.granularity}"
        return f"{self.fmt} blocks of {self.granularity}"


@dataclass(frozen=True)
class FloatLinearCase:
    w_fmt: str
    x_fmt: str | None
    m: int
    n: int
    k: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        def name(fmt: str, fp8_granularity: str) -> str:
            fp8 = fmt.startswith("float8")
            return fmt.removeprefix("float8_") + (f" {fp8_granularity}" if fp8 else "")

        weight = "w " + name(self.w_fmt, "per_row")
        return weight if self.x_fmt is None else f"{weight} + x {name(self.x_fmt, 'per_token')}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.m, self.n, self.k)


def fake_quant_cases(size: str) -> list[FloatFakeQuantCase]:
    """Every scheme x dtype over one shape (K a multiple of the blocks; rows odd)."""
    shape = {"tiny": (37, 96), "medium": (255, 256)}.get(size, (4096, 4096))
    return [
        FloatFakeQuantCase(fmt, gran, shape, dtype)
        for dtype in DTYPES
        for fmt, gran in FAKE_QUANT_SCHEMES
    ]


def linear_cases(size: str) -> list[FloatLinearCase]:
    """Every fused-linear scheme x dtype over one (M, N, K)."""
    m, n, k = {"tiny": (33, 17, 96), "medium": (129, 65, 224)}.get(size, (1024, 4096, 4096))
    return [
        FloatLinearCase(w_fmt, x_fmt, m, n, k, dtype)
        for dtype in DTYPES
        for w_fmt, x_fmt in LINEAR_SCHEMES
    ]


def _input(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: str) -> Tensor:
    """2 * randn with a zero row, a row of large values and signed zeros: the scales' edges."""
    x = 2.0 * torch.randn(shape, generator=gen, device=device)
    x[0] = 0.0
    x[1] *= 1000.0
    x[2, ::7] = -0.0
    return x.to(dtype)


def _reference(x: Tensor, fmt: str, granularity: str | int) -> Tensor:
    if fmt.startswith("float8"):
        return fake_quantize_float8_dynamic_ref(x, float8_format(fmt), str(granularity))
    if fmt == "nvfp4":
        return fake_quantize_nvfp4_ref(x, int(granularity))
    return fake_quantize_mx_ref(x, mx_format(fmt), int(granularity))


def _kernel(x: Tensor, fmt: str, granularity: str | int) -> Tensor:
    with tq.use_backend("triton"):
        if fmt.startswith("float8"):
            return tq.ops.fake_quantize_float8(x, fmt, str(granularity))
        if fmt == "nvfp4":
            return tq.ops.fake_quantize_nvfp4(x, int(granularity))
        return tq.ops.fake_quantize_mx(x, fmt, int(granularity))


def _not_run(kind: str, label: str, shape, dtype, metrics) -> list[CheckResult]:
    result = "not run: no float8 in Triton on this device (compute capability < 8.9)"
    return [CheckResult(kind, label, shape, DTYPE_NAMES[dtype], m, result, True) for m in metrics]


def check_fake_quant(case: FloatFakeQuantCase, device: str, seed: int = 0) -> list[CheckResult]:
    """The float-format fake-quant kernel against the reference, bit for bit."""
    if not _float8_triton(torch.device(device)):
        return _not_run(KIND, case.label, case.shape, case.dtype, ("y",))
    x = _input(case.shape, case.dtype, _gen(device, seed), device)
    got = _kernel(x, case.fmt, case.granularity)
    want = _reference(x, case.fmt, case.granularity)
    return [_bit_exact_row(KIND, case.label, case.shape, DTYPE_NAMES[case.dtype], "y", got, want)]


def _linear_kwargs(case: FloatLinearCase) -> dict:
    if case.w_fmt.startswith("float8"):
        return {"weight_dtype": case.w_fmt, "input_dtype": case.x_fmt}
    return {"weight_format": case.w_fmt, "input_format": case.x_fmt}


def _linear_run(case: FloatLinearCase, x, w, b, dy, backend: str) -> tuple[Tensor, ...]:
    op = tq.fp8_linear if case.w_fmt.startswith("float8") else tq.mx_linear
    xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with tq.use_backend(backend):
        y = op(xi, wi, bi, **_linear_kwargs(case))
        y.backward(dy)
    return y.detach(), xi.grad, wi.grad, bi.grad


def _operands(case: FloatLinearCase, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """The fake-quantized operands the composition multiplies (in x's dtype)."""
    fp8 = case.w_fmt.startswith("float8")
    wq = _reference(w, case.w_fmt, "per_row" if fp8 else _block(case.w_fmt))
    xq = x
    if case.x_fmt is not None:
        xq = _reference(x, case.x_fmt, "per_row" if fp8 else _block(case.x_fmt))
    return xq, wq.to(x.dtype)


def check_linear(case: FloatLinearCase, device: str, seed: int = 0) -> list[CheckResult]:
    """The fused float-format linear (Triton) vs its eager composition; relative error norm
    of both against the float64 product of the same fake-quantized operands (y, dx, dw; the
    backward is straight through, no mask)."""
    metrics = ("y", "dx", "dw", "db")
    if not _float8_triton(torch.device(device)):
        return _not_run(KIND, case.label, case.shape, case.dtype, metrics)
    gen = _gen(device, seed)
    m, n, k = case.shape
    x = (1.5 * torch.randn((m, k), generator=gen, device=device)).to(case.dtype)
    w = (0.05 * torch.randn((n, k), generator=gen, device=device)).to(case.dtype)
    b = torch.randn((n,), generator=gen, device=device).to(case.dtype)
    dy = torch.randn((m, n), generator=gen, device=device).to(case.dtype)
    out_t = _linear_run(case, x, w, b, dy, "triton")
    out_e = _linear_run(case, x, w, b, dy, "eager")
    xq, wq = _operands(case, x, w)
    x64, w64, dy64 = xq.double(), wq.double(), dy.double()
    refs = (torch.addmm(b.double(), x64, w64.t()), dy64 @ w64, dy64.t() @ x64, dy64.sum(0))
    return [
        dataclasses.replace(_linear_row(case.label, case.shape, case.dtype, *cols), kind=KIND)
        for cols in zip(metrics, out_t, out_e, refs, strict=True)
    ]
