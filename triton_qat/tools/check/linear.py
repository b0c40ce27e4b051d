"""Checks of the fused linear (forward and gradients) and of converted layers' integer GEMMs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

import triton_qat as tq
from triton_qat.flow.convert import QuantizedLinear
from triton_qat.numerics import reference
from triton_qat.numerics.qparams import PerTokenQParams, QParams
from triton_qat.ops import functional as ops
from triton_qat.tools.check.common import DTYPES, CheckResult, _gen, _linear_row, _zero_points

# --- fused linear ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearCase:
    """One fused-linear comparison: x (M, K), weight (N, K), bias (N,), all in `dtype`."""

    m: int
    n: int
    k: int
    w_granularity: str  # "per_tensor", "per_channel" or "per_group" (32)
    input_fq: bool
    dtype: torch.dtype
    # Dynamic per-token input instead: symmetric with int8 per-channel weights (w8a8_dynamic),
    # affine with int4 per-group ones (w4a8_dynamic).
    input_per_token: bool = False

    @property
    def label(self) -> str:
        w = {
            "per_tensor": "w int8 per_tensor",
            "per_channel": "w int8 per_channel",
            "per_group": "w int4 per_group(32)",
        }[self.w_granularity]
        if self.input_per_token:
            scheme = "sym" if self.w_granularity == "per_channel" else "asym"
            return f"{w} + x per_token({scheme})"  # int8, as the per-tensor input
        return w + (" + x int8 per_tensor" if self.input_fq else "")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.m, self.n, self.k)


BOOLS = (False, True)


def linear_cases(size: str) -> list[LinearCase]:
    """Weight granularities x input fake quant (none, per tensor; per token with per-channel
    and per-group weights) x dtypes, over one or more (M, N, K)."""
    if size == "tiny":
        shapes = {dtype: [(33, 17, 96)] for dtype in DTYPES}
    elif size == "medium":
        shapes = {dtype: [(129, 65, 224)] for dtype in DTYPES}
    else:
        shapes = {
            torch.bfloat16: [(1024, 4096, 4096), (8192, 4096, 4096), (1000, 4000, 4064)],
            torch.float16: [(1024, 4096, 4096)],
            torch.float32: [(1024, 4096, 4096)],
        }
    return [
        LinearCase(m, n, k, gran, input_fq, dtype, per_token)
        for dtype in (torch.bfloat16, torch.float16, torch.float32)
        for m, n, k in shapes[dtype]
        for gran, input_fq, per_token in (
            *((g, fq, False) for g in ("per_tensor", "per_channel", "per_group") for fq in BOOLS),
            ("per_channel", False, True),
            ("per_group", False, True),
        )
    ]


def _linear_qparams(case: LinearCase, device: str, gen: torch.Generator):
    n, k = case.n, case.k
    if case.w_granularity == "per_tensor":
        wqp = QParams(5.0 / 255, 3, -128, 127)
    elif case.w_granularity == "per_channel":
        scale = (5.0 / 255) * (0.5 + torch.rand(n, generator=gen, device=device))
        zp = _zero_points((n,), -128, 127, False, gen, device)
        wqp = QParams(scale, zp, -128, 127, axis=0)
    else:
        pshape = (n, k // 32)
        scale = (5.0 / 15) * (0.5 + torch.rand(pshape, generator=gen, device=device))
        zp = _zero_points(pshape, 0, 15, False, gen, device)
        wqp = QParams(scale, zp, 0, 15, group_size=32)
    # About [-4.0, 3.7]: clamps a few values of 1.5 * randn.
    xqp = QParams(0.03, 5, -128, 127) if case.input_fq else None
    if case.input_per_token:
        xqp = PerTokenQParams(-128, 127, symmetric=case.w_granularity == "per_channel")
    return wqp, xqp


def _linear_run(x, w, b, dy, wqp, xqp, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with tq.use_backend(backend):
        y = tq.fq_linear(xi, wi, bi, weight_qparams=wqp, input_qparams=xqp)
        y.backward(dy)
    return y.detach(), xi.grad, wi.grad, bi.grad


def _linear_reference64(x, w, b, dy, wqp, xqp) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, dx, dw, db in float64 from the same rounded operands the kernels multiply
    (per-token input qparams from the eager formula)."""
    with torch.no_grad(), tq.use_backend("eager"):
        lq = ops.linear_quant(x, w, wqp, xqp)
        xq, mask_x, wq, mask_w = reference.fq_linear_operands(x, w, lq)
        x64, w64, dy64 = xq.double(), wq.double(), dy.double()
        y = torch.addmm(b.double(), x64, w64.t())
        dx = dy64 @ w64
        if mask_x is not None:
            dx = dx * mask_x
        dw = (dy64.t() @ x64) * mask_w
        return y, dx, dw, dy64.sum(0)


def check_linear(case: LinearCase, device: str, seed: int = 0) -> list[CheckResult]:
    """tq.fq_linear: Triton kernels vs eager composition, rel. error against float64."""
    gen = _gen(device, seed)
    m, n, k = case.shape
    x = (1.5 * torch.randn((m, k), generator=gen, device=device)).to(case.dtype)
    w = torch.randn((n, k), generator=gen, device=device).to(case.dtype)
    b = torch.randn((n,), generator=gen, device=device).to(case.dtype)
    dy = torch.randn((m, n), generator=gen, device=device).to(case.dtype)
    wqp, xqp = _linear_qparams(case, device, gen)
    out_t = _linear_run(x, w, b, dy, wqp, xqp, "triton")
    out_e = _linear_run(x, w, b, dy, wqp, xqp, "eager")
    refs = _linear_reference64(x, w, b, dy, wqp, xqp)
    return [
        _linear_row(case.label, case.shape, case.dtype, metric, t, e, r)
        for metric, t, e, r in zip(("y", "dx", "dw", "db"), out_t, out_e, refs, strict=True)
    ]


# --- converted layers: the integer GEMMs ---------------------------------------------------


@dataclass(frozen=True)
class IntLinearCase:
    """One converted layer (tq.convert of a QAT Linear with `preset`): its integer-GEMM
    kernels (weight-only, W8A8, W4A8) against its eager path."""

    preset: str
    m: int
    n: int
    k: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"convert({self.preset})"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.m, self.n, self.k)


def int_linear_cases(size: str) -> list[IntLinearCase]:
    """Presets x dtypes over one (M, N, K)."""
    m, n, k = {"tiny": (33, 17, 96), "medium": (129, 65, 224)}.get(size, (1024, 4096, 4096))
    presets = ("int8_per_channel", "int4_per_group", "w8a8_dynamic", "w4a8_dynamic")
    return [IntLinearCase(p, m, n, k, dtype) for p in presets for dtype in DTYPES]


def check_int_linear(case: IntLinearCase, device: str, seed: int = 0) -> list[CheckResult]:
    """The converted layer on the Triton backend (integer GEMMs) vs the eager backend
    (dequantize, fake-quantize the input, F.linear); relative error norm against a float64
    product of the eager path's operands, within the dtype's tolerance as the fused linear."""

    gen = _gen(device, seed)
    m, n, k = case.shape
    layer = torch.nn.Sequential(torch.nn.Linear(k, n)).to(device=device, dtype=case.dtype)
    x = (1.5 * torch.randn((m, k), generator=gen, device=device)).to(case.dtype)
    with torch.no_grad(), tq.use_backend("eager"):
        qat = tq.prepare_qat(layer, case.preset)
        qat(x)  # the observers see the data once
        converted = tq.convert(qat.eval())
        q = converted[0]
        assert isinstance(q, QuantizedLinear)
        y_eager = converted(x)
        xin = q.fake_quantized_input(x)
        ref = torch.addmm(q.bias.double(), xin.double(), q.dequantized_weight().double().t())
    with torch.no_grad(), tq.use_backend("triton"):
        y = converted(x)
    row = _linear_row(case.label, case.shape, case.dtype, "y", y, y_eager, ref)
    return [dataclasses.replace(row, kind="int_linear")]
