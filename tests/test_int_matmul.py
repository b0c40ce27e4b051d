"""Integer GEMMs (triton_qat.kernels.int_matmul) against exact integer / float64 references.

Tolerances are worst-case rounding bounds, not fitted: with u the unit roundoff of a format
(2**-24 fp32, 2**-11 fp16, 2**-8 bf16), a sum of K products accumulated in fp32 is off by at
most K * u32 * sum|products|, each further fp32 operation adds u32 of its operands, a weight
rounded to the input dtype u_in of its term, and the final cast u_out of the result.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_bitwise_equal, assert_within

import triton_qat as tq
from triton_qat.flow.convert import QuantizedLinear, _pack_int4
from triton_qat.kernels import int_matmul as im
from triton_qat.numerics.observer_formulas import row_quant, static_row_quant
from triton_qat.numerics.qparams import QParams, int_weight, normalize
from triton_qat.numerics.reference import quantized_codes_ref
from triton_qat.quantizers import (
    DynamicPerTokenFakeQuantize,
    fake_quantize_per_token,
    per_token_qparams,
)

U32 = 2.0**-24
UNIT = {torch.float32: U32, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _weight(n, k, gran, qrange, packed, seed, group_size=None, with_zp=True):
    """Random codes (N, K) int32 with qparams, and the IntWeight the kernels take."""
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange
    q = torch.randint(qmin, qmax + 1, (n, k), generator=gen, dtype=torch.int32)
    count = {"tensor": 1, "channel": n, "group": n * k // (group_size or 1)}[gran]
    scale = torch.rand(count, generator=gen) * 0.02 + 0.001
    if with_zp:
        zp = torch.randint(qmin, qmax + 1, (count,), generator=gen, dtype=torch.int32)
    else:
        zp = torch.zeros(count, dtype=torch.int32)
    stored = _pack_int4(q, qmin) if packed else q.to(torch.int8)
    wt = int_weight(stored, scale, zp, qmin, qmax, k, group_size if gran == "group" else None)
    return q, scale, zp, wt


def _expand(t: torch.Tensor, n: int, k: int, group_size: int | None) -> torch.Tensor:
    """Per-tensor / per-channel / per-group qparams as an (N, K) float64 table."""
    t = t.double()
    if t.numel() == 1:
        return t.expand(n, k)
    if t.numel() == n:
        return t.view(n, 1).expand(n, k)
    return t.view(n, -1).repeat_interleave(group_size, dim=1)


def _dequantized64(q, scale, zp, group_size):
    n, k = q.shape
    return (q.double() - _expand(zp, n, k, group_size)) * _expand(scale, n, k, group_size)


# (M, N, K), granularity, code range, packed 4-bit, group size, input dtype, bias, 3-D input
WEIGHT_ONLY_CASES = [
    ((1, 33, 70), "tensor", (-128, 127), False, None, torch.float32, True, False),
    ((17, 33, 70), "channel", (-128, 127), False, None, torch.bfloat16, False, True),
    ((17, 17, 70), "channel", (-8, 7), True, None, torch.float32, True, False),
    ((33, 17, 64), "group", (0, 15), True, 32, torch.float16, True, False),
    ((17, 33, 70), "group", (-8, 7), True, 35, torch.bfloat16, True, True),
]


@pytest.mark.parametrize("case", WEIGHT_ONLY_CASES, ids=lambda c: f"{c[1]}-{c[4]}-{c[5]}")
def test_weight_only_matches_float64(case, device):
    (m, n, k), gran, qrange, packed, g, dtype, has_bias, three_d = case
    q, scale, zp, wt = _weight(n, k, gran, qrange, packed, seed=m + n + k, group_size=g)
    wt = wt._replace(**{f: getattr(wt, f).to(device) for f in ("codes", "scale", "zero_point")})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    xin = x.unsqueeze(1) if three_d else x
    y = im.weight_only_linear(xin.to(device), wt, None if bias is None else bias.to(device))
    assert y.shape == (*xin.shape[:-1], n) and y.dtype == dtype
    w64 = _dequantized64(q, scale, zp, g)
    b64 = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
    ref = x.double() @ w64.T + b64
    mag = x.double().abs() @ w64.abs().T + b64.abs()
    # Per group the weight is rounded to the input dtype (u_in); per channel / tensor the
    # integer (q - zp) is exact and the scale is one more fp32 rounding. K + 2 fp32 steps.
    u_w = UNIT[dtype] if gran == "group" else 0.0
    bound = (u_w + (k + 2) * U32) * mag + UNIT[dtype] * ref.abs()
    assert_within(y.cpu().reshape(m, n), ref, bound, "weight-only GEMM")


@pytest.mark.parametrize(
    "dtype,qrange,qscheme",
    [
        (torch.float32, (-128, 127), torch.per_tensor_symmetric),
        (torch.bfloat16, (-128, 127), torch.per_tensor_affine),
        (torch.float16, (0, 255), torch.per_tensor_affine),
    ],
)
def test_quantize_rows_matches_per_token_fake_quant(dtype, qrange, qscheme, device):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(17, 70, generator=gen) * 3).to(dtype)
    x[3] = 0.0  # scale falls back to eps
    x[5] = x[5].abs()  # no negative value: min clamps to 0
    x[6, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.0, -128.0]).to(dtype)  # ties
    qmin, qmax = qrange
    qdtype = torch.quint8 if qmin == 0 else torch.qint8
    xq = im.quantize_rows(x.to(device), row_quant(qmin, qmax, qscheme, qdtype))
    scale, zp = per_token_qparams(x, qmin, qmax, qscheme, qdtype)
    assert_bitwise_equal(xq.scale.cpu(), scale, "row scales")
    assert_bitwise_equal(xq.zero_point.cpu(), zp, "row zero points")
    codes = quantized_codes_ref(x, normalize(x, QParams(scale, zp, qmin, qmax, axis=0)))
    assert_bitwise_equal(xq.codes.cpu().to(torch.int32) + xq.shift, codes, "row codes")
    assert_bitwise_equal(xq.code_sum.cpu(), (codes - xq.shift).sum(1, dtype=torch.int32), "sums")
    # The codes are those of the fake quant the QAT layer runs: (q - zp) * scale gives it back.
    y = ((codes - zp[:, None]).float() * scale[:, None]).to(dtype)
    rows = fake_quantize_per_token(x, qmin, qmax, qscheme, qdtype)
    assert_bitwise_equal(y, rows, "dequantized codes")


def test_quantize_rows_static_per_tensor(device):
    x = torch.randn(33, 17, generator=torch.Generator().manual_seed(3))
    scale, zp = torch.tensor([0.02]), torch.tensor([7], dtype=torch.int32)
    xq = im.quantize_rows(x.to(device), static_row_quant(scale.to(device), zp.to(device), 0, 255))
    codes = quantized_codes_ref(x, normalize(x, QParams(scale, zp, 0, 255)))
    assert_bitwise_equal(xq.codes.cpu().to(torch.int32) + xq.shift, codes, "static codes")
    assert bool((xq.scale.cpu() == scale).all()) and bool((xq.zero_point.cpu() == 7).all())


def _int_reference(xq, q, wscale, wzp, group_size, bias):
    """Exact int64 sums per group, scaled in float64: (sum_g sx * sw_g * D_g + b, magnitude
    sum_g |sx * sw_g * D_g| + |b|)."""
    cx = xq.codes.cpu().long() + xq.shift - xq.zero_point.cpu().long()[:, None]
    n, k = q.shape
    g = group_size or k
    cw = q.long() - _expand(wzp, n, k, group_size).long()
    sw = _expand(wscale, n, k, group_size)[:, ::g]  # (N, groups)
    sx = xq.scale.cpu().double()[:, None]
    terms = torch.stack(
        [
            (cx[:, j * g : (j + 1) * g] @ cw[:, j * g : (j + 1) * g].T).double()
            for j in range(k // g)
        ]
    )  # (groups, M, N), exact integers
    scaled = terms * sw.T[:, None, :] * sx
    b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
    return scaled.sum(0) + b, scaled.abs().sum(0) + b.abs(), k // g


# (M, N, K), input (qscheme or "static"), input range, weight granularity, weight range,
# packed, group size, dtype, bias
INT8_CASES = [
    ((17, 33, 70), torch.per_tensor_symmetric, (-128, 127), "channel", (-127, 127), False, None,
     torch.bfloat16, True),
    ((1, 17, 70), torch.per_tensor_affine, (-128, 127), "channel", (-128, 127), False, None,
     torch.float32, False),
    ((33, 17, 33), "static", (0, 255), "tensor", (-128, 127), False, None, torch.float16, True),
    ((17, 17, 70), torch.per_tensor_affine, (-128, 127), "channel", (-8, 7), True, None,
     torch.float32, True),
    ((17, 33, 64), torch.per_tensor_affine, (-128, 127), "group", (0, 15), True, 32,
     torch.float32, True),
    ((17, 17, 70), torch.per_tensor_symmetric, (-128, 127), "group", (-8, 7), True, 35,
     torch.bfloat16, False),
    ((1, 33, 70), torch.per_tensor_affine, (-128, 127), "group", (-64, 63), False, 35,
     torch.float16, True),
]  # fmt: skip


@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: f"{c[3]}-{c[6]}-{c[7]}")
def test_int8_linear_is_the_integer_sum(case, device):
    (m, n, k), scheme, xrange, gran, wrange, packed, g, dtype, has_bias = case
    q, wscale, wzp, wt = _weight(n, k, gran, wrange, packed, seed=7 * m + n, group_size=g)
    wt = wt._replace(**{f: getattr(wt, f).to(device) for f in ("codes", "scale", "zero_point")})
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(m, k, generator=gen) + 0.3).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    if scheme == "static":
        s, z = torch.tensor([0.01]), torch.tensor([120], dtype=torch.int32)
        rq = static_row_quant(s.to(device), z.to(device), *xrange)
    else:
        rq = row_quant(*xrange, scheme)
    xq = im.quantize_rows(x.to(device), rq)
    y = im.int8_linear(xq, wt, None if bias is None else bias.to(device), dtype).cpu()
    ref, mag, groups = _int_reference(xq, q, wscale, wzp, g, bias)
    # The int32 sums are exact; per group (groups + 2) fp32 steps (D_g * s_g accumulated,
    # times sx, plus bias); otherwise D to fp32, times sx, times sw, plus bias: 4 roundings.
    steps = groups + 3 if g else 4
    assert_within(y, ref, steps * U32 * mag + UNIT[dtype] * ref.abs(), "int8 GEMM vs int64")
    # And it is the fake-quant float path F.linear(fq(x), fq(w)): fq(x) rounded to x's
    # dtype (u_in) and the fp32 products (q - zp) * s rounded once (u32) per operand.
    fq_x = (xq.codes.cpu().float() + xq.shift - xq.zero_point.cpu()[:, None]) * xq.scale.cpu()[
        :, None
    ]
    fq_x = fq_x.to(dtype).double()
    fq_w = _dequantized64(q, wscale, wzp, g).float().double()
    fq_ref = fq_x @ fq_w.T + (0 if bias is None else bias.double())
    fq_mag = fq_x.abs() @ fq_w.abs().T + (0 if bias is None else bias.double().abs())
    bound = (UNIT[dtype] + 2 * U32) * fq_mag + steps * U32 * mag + UNIT[dtype] * ref.abs()
    assert_within(y, fq_ref, bound, "int8 GEMM vs fake-quant float64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_linear_equals_fake_quant_linear(dtype, device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 70, generator=gen).to(dtype)
    w = (torch.randn(33, 70, generator=gen) * 0.1).to(dtype)
    b = torch.randn(33, generator=gen).to(dtype)
    wscale = w.float().abs().amax(1) / 127
    wqp = QParams(wscale, torch.zeros(33, dtype=torch.int32), -128, 127, axis=0)
    rq = row_quant(-128, 127, torch.per_tensor_symmetric)
    y = im.w8a8_linear(
        x.to(device),
        w.to(device),
        b.to(device),
        weight_qparams=QParams(wscale.to(device), wqp.zero_point.to(device), -128, 127, axis=0),
        input_quant=rq,
    )
    assert y.shape == (2, 9, 33) and y.dtype == dtype
    with tq.use_backend("eager"):
        fq_x = fake_quantize_per_token(x, -128, 127, torch.per_tensor_symmetric).double()
        fq_w = tq.fake_quantize_per_channel(w, wscale, wqp.zero_point, 0, -128, 127).double()
    ref = F.linear(fq_x, fq_w, b.double())
    mag = F.linear(fq_x.abs(), fq_w.abs(), b.double().abs())
    # fq operands rounded to the input dtype (2 u_in), 4 fp32 steps, the output cast.
    bound = (2 * UNIT[dtype] + 4 * U32) * mag + UNIT[dtype] * ref.abs()
    assert_within(y.cpu(), ref, bound, "w8a8_linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_w8a8_forward_is_the_int8_gemm(monkeypatch, dtype, device):
    """tq.fq_linear with a dynamic per-token input and 8-bit per-channel weights (the
    w8a8_dynamic preset) runs its forward as one int8 GEMM: the float path's result up to the
    final scaling's rounding; the backward (float kernels) is the float path's, bit for bit."""
    from triton_qat.numerics.qparams import PerTokenQParams

    calls = []
    real = im.fq_linear_int8_forward
    monkeypatch.setattr(im, "fq_linear_int8_forward", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 9, 70, generator=gen).to(dtype)
    w = (torch.randn(33, 70, generator=gen) * 0.1).to(dtype)
    b = torch.randn(33, generator=gen).to(dtype)
    dy = torch.randn(2, 9, 33, generator=gen).to(dtype)
    wscale = w.float().abs().amax(1) / 127
    spec = PerTokenQParams(-128, 127, symmetric=True)

    def run(int8: str):
        monkeypatch.setenv("TRITON_QAT_INT8_FORWARD", int8)
        xx, ww, bb = (t.clone().to(device).requires_grad_() for t in (x, w, b))
        wqp = QParams(wscale.to(device), torch.zeros(33, dtype=torch.int32, device=device),
                      -128, 127, axis=0)  # fmt: skip
        with tq.use_backend("triton"):
            y = tq.fq_linear(xx, ww, bb, weight_qparams=wqp, input_qparams=spec)
            y.backward(dy.to(device))
        return y.detach().cpu(), [t.grad.cpu() for t in (xx, ww, bb)]

    y_int, grads_int = run("1")
    assert len(calls) == 1
    y_float, grads_float = run("0")
    assert len(calls) == 1
    for name, a, e in zip(("dx", "dw", "db"), grads_int, grads_float, strict=True):
        assert_bitwise_equal(a, e, name)
    with tq.use_backend("eager"):
        fq_x = fake_quantize_per_token(x, -128, 127, torch.per_tensor_symmetric).double()
        fq_w = tq.fake_quantize_per_channel(w, wscale, torch.zeros(33, dtype=torch.int32), 0,
                                            -128, 127).double()  # fmt: skip
    ref = F.linear(fq_x, fq_w, b.double())
    mag = F.linear(fq_x.abs(), fq_w.abs(), b.double().abs())
    # fq operands rounded to the input dtype (2 u_in), 4 fp32 steps, the output cast.
    bound = (2 * UNIT[dtype] + 4 * U32) * mag + UNIT[dtype] * ref.abs()
    assert_within(y_int, ref, bound, "int8 forward")
    assert_within(y_float, ref, bound + 70 * U32 * mag, "float forward")


# qparams granularity, quant range, float zero point: the weight codes pass of the integer
# forward (im._weight_codes over kernels.fake_quant.quantized_codes).
CODES_CASES = [
    ("tensor", (-128, 127), False),
    ("channel", (0, 255), False),  # uint8 range: stored shifted into int8
    ("group32", (-8, 7), False),
    ("group48", (0, 15), False),
    ("group32", (-8, 7), True),  # float zero point: codes only (no integer GEMM takes it)
]


@pytest.mark.parametrize("case", CODES_CASES, ids=lambda c: f"{c[0]}-{c[1][0]}-{c[2]}")
def test_weight_codes_are_the_reference_codes(case, device):
    """W's int8 codes, bit for bit those of reference.quantized_codes_ref: NaN (-> quant_min),
    +-inf, ties at every element (power-of-two scales), values far beyond the range."""
    from triton_qat.kernels.fake_quant import quantized_codes
    from triton_qat.numerics.reference import reciprocal

    gran, (qmin, qmax), float_zp = case
    gen = torch.Generator().manual_seed(11)
    n, k = 5, 96
    # Halves of multiples of a power-of-two scale: x * inv lands on .5 exactly (a tie).
    w = (torch.randint(-40, 40, (n, k), generator=gen) + 0.5) * 2.0 ** -torch.randint(
        0, 4, (n, k), generator=gen
    )
    w[:, 1::3] = torch.randn(n, k // 3, generator=gen) * 4  # anything
    w[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, -0.0])
    if gran == "tensor":
        qp = QParams(0.25, 3, qmin, qmax)
    elif gran == "channel":
        scale = 2.0 ** -torch.randint(0, 4, (n,), generator=gen).float()
        scale[1] = 0.0123  # and an inexact 1 / scale
        qp = QParams(scale, torch.randint(qmin, qmax + 1, (n,), generator=gen), qmin, qmax, axis=0)
    else:
        g = int(gran[5:])
        scale = 2.0 ** -torch.randint(0, 4, (n, k // g), generator=gen).float()
        scale[1] = 0.0371
        zp = torch.randint(qmin, qmax + 1, (n, k // g), generator=gen)
        zp = zp.float() * 0.5 + 0.25 if float_zp else zp.int()  # within the range
        qp = QParams(scale, zp, qmin, qmax, group_size=g)
    nq = normalize(w, qp)
    want = quantized_codes_ref(w, nq)
    nq_dev = nq._replace(scale=nq.scale.to(device), zero_point=nq.zero_point.to(device))
    if float_zp:
        got = quantized_codes(w.to(device), nq_dev, reciprocal(nq_dev.scale))
        assert_bitwise_equal(got.cpu().int(), want, "codes")
        return
    wt = im._weight_codes(w.to(device), nq_dev, reciprocal(nq_dev.scale))
    shift = im.code_shift(qmin, qmax)
    assert_bitwise_equal(wt.codes.cpu().int() + shift, want, "codes")
    assert (wt.quant_min + shift, wt.quant_max + shift) == (qmin, qmax)
    assert_bitwise_equal(wt.zero_point.cpu() + shift, nq.zero_point, "zero points")
    assert wt.group_size == (int(gran[5:]) if gran.startswith("group") else 0)


# (M, N, K), group size, weight range, weight zero points, input qscheme, x dtype, weight
# dtype (float32: master weights under a bf16 input), bias
W4A8_CASES = [
    ((17, 33, 128), 32, (-8, 7), False, torch.per_tensor_affine, torch.float32, torch.float32,
     True),
    ((9, 17, 128), 64, (-8, 7), True, torch.per_tensor_symmetric, torch.bfloat16,
     torch.bfloat16, False),
    ((5, 19, 96), 48, (0, 15), True, torch.per_tensor_affine, torch.bfloat16, torch.float32,
     True),
    ((0, 17, 64), 32, (-8, 7), True, torch.per_tensor_affine, torch.float32, torch.float32,
     True),
]  # fmt: skip


def _w4a8_bounds(fq_x, fq_w, bias, dtype, k, groups):
    """F.linear(fq_x, fq_w, b) in float64 and the bounds on |y - it| of the integer forward
    and of the float forward, from the eager operands fq_x, fq_w (as the float path rounds
    them) of a per-token input and per-group weight.

    Exact values X = (cx - zx) * sx, W = (cw - zw) * sw. The eager operands round X and W to
    fp32 (u32) and then to the input dtype (u_in; the same rounding for fp32): the reference
    is off the exact sum by at most 2 * u_op * mag. The integer forward sums each group in
    int32 exactly, then D_g to fp32, D_g * s_g, the fp32 sum over the groups, * sx and + b:
    at most (groups + 3) fp32 roundings of the magnitude, and the cast of y (u_out). The float
    forward multiplies the eager operands exactly into fp32 and sums K of them, plus the bias:
    (K + 1) u32, and the cast of y."""
    u_in = UNIT[dtype]
    u_op = U32 if dtype == torch.float32 else U32 + u_in
    b64 = torch.zeros(fq_w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    ref = F.linear(fq_x.double(), fq_w.double(), b64)
    mag = F.linear(fq_x.double().abs(), fq_w.double().abs(), b64.abs())
    bound_int = (2 * u_op + (groups + 3) * U32) * mag + u_in * ref.abs()
    bound_float = (k + 1) * U32 * mag + u_in * ref.abs()
    return ref, bound_int, bound_float


@pytest.mark.parametrize("case", W4A8_CASES, ids=lambda c: f"{c[0]}-g{c[1]}-{c[5]}")
def test_fused_w4a8_forward_is_the_int8_gemm(monkeypatch, case, device):
    """tq.fq_linear with a dynamic per-token 8-bit input and per-group 4-bit weights (the
    w4a8_dynamic preset) runs its forward as the int8 GEMM with group scales in the K loop:
    the float path's and the eager composition's result within the bounds of _w4a8_bounds;
    the backward (float kernels) is the float path's, bit for bit."""
    (m, n, k), g, (qmin, qmax), with_zp, qscheme, dtype, w_dtype, has_bias = case
    calls = []
    real = im.fq_linear_int8_forward
    monkeypatch.setattr(im, "fq_linear_int8_forward", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(12)
    x = (torch.randn(m, k, generator=gen) + 0.3).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.1).to(w_dtype)
    b = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    dy = torch.randn(m, n, generator=gen).to(dtype)
    wg = w.float().view(n, k // g, g)
    if with_zp:  # affine per group, as int4_per_group128
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        wscale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
        wzp = (qmin - torch.round(lo / wscale)).clamp(qmin, qmax).int()
    else:  # symmetric, zero point 0, as the w4a8_dynamic preset
        wscale = wg.abs().amax(-1) / ((qmax - qmin) / 2)
        wzp = torch.zeros_like(wscale, dtype=torch.int32)
    spec = DynamicPerTokenFakeQuantize(torch.qint8, qscheme, -128, 127).per_token_spec()

    def run(int8: str):
        monkeypatch.setenv("TRITON_QAT_INT8_FORWARD", int8)
        leaves = [t.clone().to(device).requires_grad_() for t in (x, w, b) if t is not None]
        wqp = QParams(wscale.to(device), wzp.to(device), qmin, qmax, group_size=g)
        with tq.use_backend("triton"):
            y = tq.fq_linear(*leaves[:2], leaves[2] if has_bias else None, weight_qparams=wqp,
                             input_qparams=spec)  # fmt: skip
            y.backward(dy.to(device))
        return y.detach().cpu(), [t.grad.cpu() for t in leaves]

    y_int, grads_int = run("group")
    assert len(calls) == 1
    y_float, grads_float = run("0")
    assert len(calls) == 1
    assert y_int.shape == (m, n) and y_int.dtype == dtype
    for name, a, e in zip(("dx", "dw", "db"), grads_int, grads_float, strict=False):
        assert_bitwise_equal(a, e, name)
    with tq.use_backend("eager"):
        fq_x = fake_quantize_per_token(x, -128, 127, qscheme)
        fq_w = tq.fake_quantize_per_group(w, wscale, wzp, g, qmin, qmax).to(dtype)
    ref, bound_int, bound_float = _w4a8_bounds(fq_x, fq_w, b, dtype, k, k // g)
    assert_within(y_int, ref, bound_int, "int8 forward vs eager composition")
    assert_within(y_float, ref, bound_float, "float forward vs eager composition")
    assert_within(y_int, y_float.double(), bound_int + bound_float, "int8 vs float forward")


def test_w4a8_linear_layer_takes_the_int8_forward(monkeypatch, device):
    """tq.nn.Linear with the w4a8_dynamic preset, training, Triton backend, and
    TRITON_QAT_INT8_FORWARD=group: the forward is the int8 GEMM (fq_linear_int8_forward
    runs), within _w4a8_bounds of the float forward; its gradients are bitwise those of
    TRITON_QAT_INT8_FORWARD=0."""
    import copy

    calls = []
    real = im.fq_linear_int8_forward
    monkeypatch.setattr(im, "fq_linear_int8_forward", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(13)
    layer = tq.nn.Linear(64, 17, qconfig="w4a8_dynamic").to(device)
    gen = torch.Generator().manual_seed(14)
    x = (torch.randn(2, 5, 64, generator=gen) * 2).to(device)
    dy = torch.randn(2, 5, 17, generator=gen).to(device)

    def run(int8: str):
        monkeypatch.setenv("TRITON_QAT_INT8_FORWARD", int8)
        mod = copy.deepcopy(layer)  # the same observer state for both runs
        xi = x.clone().requires_grad_()
        with tq.use_backend("triton"):
            y = mod(xi)
            y.backward(dy)
        grads = [t.grad.cpu() for t in (xi, mod.weight, mod.bias)]
        with torch.no_grad(), tq.use_backend("eager"):
            fq_w = mod.weight_fake_quant(mod.weight).cpu()
        return y.detach().cpu(), grads, fq_w

    y_int, grads_int, fq_w = run("group")
    assert len(calls) == 1
    y_float, grads_float, fq_w_float = run("0")
    assert len(calls) == 1
    assert_bitwise_equal(fq_w, fq_w_float, "fake-quantized weight")
    for name, a, e in zip(("dx", "dw", "db"), grads_int, grads_float, strict=True):
        assert_bitwise_equal(a, e, name)
    fq_x = fake_quantize_per_token(x.cpu(), -128, 127, torch.per_tensor_affine)
    _, bound_int, bound_float = _w4a8_bounds(fq_x, fq_w, layer.bias.cpu(), torch.float32, 64, 2)
    assert_within(y_int, y_float.double(), bound_int + bound_float, "int8 vs float forward")


def _qat_layer(name: str, dtype: torch.dtype, k: int = 64, n: int = 17) -> torch.nn.Module:
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(k, n)).to(dtype)
    qat = tq.prepare_qat(model, name)
    with tq.use_backend("eager"):
        qat(torch.randn(8, k, dtype=dtype))  # observers see data once
    return qat.eval()


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("w8a8_dynamic", torch.float32),
        ("w4a8_dynamic", torch.bfloat16),
        ("int4_per_group", torch.float32),
        ("int8_per_channel", torch.bfloat16),
        ("x86", torch.float32),
    ],
)
def test_quantized_linear_kernel_path_matches_eager(name, dtype, device):
    qat = _qat_layer(name, dtype)
    x = torch.randn(3, 5, 64, dtype=dtype)
    with torch.no_grad(), tq.use_backend("eager"):
        y_qat = qat(x)
        converted = tq.convert(qat)
        layer = converted[0]
        assert isinstance(layer, QuantizedLinear)
        y_eager = converted(x)
        # The eager layer's operands, for the rounding bound.
        xin = layer.fake_quantized_input(x)
        w = layer.dequantized_weight().to(dtype)
    assert layer.int_weight() is not None
    converted.to(device)
    with torch.no_grad(), tq.use_backend("triton"):
        y = converted(x.to(device)).cpu()
    assert y.shape == y_eager.shape and y.dtype == dtype
    b = layer.bias.double().abs()
    mag = xin.double().abs() @ w.double().abs().T + b
    # Either side rounds its operands to the input dtype (2 u_in) and accumulates K = 64
    # products in fp32 plus a few epilogue steps; both round the result to the input dtype.
    bound = (2 * UNIT[dtype] + 70 * U32) * mag + 2 * UNIT[dtype] * y_eager.double().abs()
    assert_within(y, y_eager.double(), bound, f"{name}: kernel vs eager QuantizedLinear")
    assert_within(y, y_qat.double(), bound, f"{name}: kernel vs QAT eval")


def test_kernel_path_runs_only_on_the_triton_backend(monkeypatch, device):
    qat = _qat_layer("w8a8_dynamic", torch.float32)
    converted = tq.convert(qat).to(device)
    calls = []
    monkeypatch.setattr(im, "int8_linear", lambda *a: calls.append(a) or torch.zeros(2, 17))
    x = torch.randn(2, 64, device=device)
    with torch.no_grad(), tq.use_backend("eager"):
        converted(x)
    assert not calls
    with torch.no_grad(), tq.use_backend("triton"):
        converted(x)
    assert len(calls) == 1
    # A gradient through the input needs the eager path (the integer GEMMs have no backward).
    with tq.use_backend("triton"):
        y = converted(x.requires_grad_())
    assert len(calls) == 1 and y.grad_fn is not None


def test_bad_codes_and_groups_are_rejected():
    scale, zp = torch.ones(4), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(TypeError, match="codes must be int8"):
        int_weight(torch.zeros(4, 8, dtype=torch.int16), scale, zp, -128, 127, 8)
    with pytest.raises(TypeError, match="codes must be int8"):
        int_weight(torch.zeros(4, 8), scale, zp, -128, 127, 8)
    with pytest.raises(ValueError, match="group_size 3 does not divide in_features"):
        int_weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(8), torch.zeros(8), -8, 7, 8, 3)
    with pytest.raises(ValueError, match="packed 4-bit codes"):
        int_weight(torch.zeros(4, 4, dtype=torch.uint8), scale, zp, -128, 127, 8)
    with pytest.raises(TypeError, match="zero_point must be an integer"):
        int_weight(torch.zeros(4, 8, dtype=torch.int8), scale, zp.float(), -128, 127, 8)
    with pytest.raises(ValueError, match="scale must have 1 or 4 elements"):
        int_weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), zp, -128, 127, 8)


def test_wide_per_group_codes_are_rejected(device):
    _, _, _, wt = _weight(4, 64, "group", (-128, 127), False, seed=0, group_size=32)
    xq = im.quantize_rows(torch.randn(2, 64, device=device), row_quant(-128, 127))
    with pytest.raises(ValueError, match="at most 127 wide"):
        im.int8_linear(xq, wt, None, torch.float32)


# --- property: random problems (the fuzz budget: conftest's hypothesis profiles) -----------

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None


if given is not None:
    _DIM = st.integers(1, 40)
    _DTYPE = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])

    @st.composite
    def _weight_codes(draw, *, int8_gemm: bool):
        """(n, k, granularity, range, packed, group size) of a random integer weight. The int8
        GEMM keeps group sums in int32 lanes of at most 127-wide codes (see its check)."""
        gran = draw(st.sampled_from(["tensor", "channel", "group"]))
        packed = draw(st.booleans())
        if packed:
            wrange = draw(st.sampled_from([(-8, 7), (0, 15), (-4, 3)]))
        elif gran == "group" and int8_gemm:
            wrange = draw(st.sampled_from([(-64, 63), (-8, 7), (0, 100)]))
        else:
            wrange = draw(st.sampled_from([(-128, 127), (-127, 127), (-64, 63)]))  # int8 codes
        g = draw(st.sampled_from([8, 32, 35])) if gran == "group" else None
        k = g * draw(st.integers(1, 3)) if g else draw(_DIM)
        return draw(_DIM), k, gran, wrange, packed, g

    @given(_weight_codes(int8_gemm=False), _DIM, _DTYPE, st.booleans(), st.booleans())
    def test_property_weight_only_matches_float64(device, weight, m, dtype, bias, three_d):
        n, k, gran, wrange, packed, g = weight
        case = ((m, n, k), gran, wrange, packed, g, dtype, bias, three_d)
        test_weight_only_matches_float64(case, device)

    @given(
        _weight_codes(int8_gemm=True),
        _DIM,
        st.sampled_from([torch.per_tensor_symmetric, torch.per_tensor_affine, "static"]),
        _DTYPE,
        st.booleans(),
    )
    def test_property_int8_linear_is_the_integer_sum(device, weight, m, scheme, dtype, bias):
        n, k, gran, wrange, packed, g = weight
        xrange = (0, 255) if scheme == "static" else (-128, 127)
        case = ((m, n, k), scheme, xrange, gran, wrange, packed, g, dtype, bias)
        test_int8_linear_is_the_integer_sum(case, device)


def test_per_group_integer_forward_is_opt_in(monkeypatch):
    """Per-group weights keep the float forward unless TRITON_QAT_INT8_FORWARD=group; per
    channel takes the integer forward by default (int8_forward_applies' docstring: why)."""
    from triton_qat.ops.functional import linear_quant

    x, w = torch.randn(4, 64), torch.randn(8, 64)
    spec = DynamicPerTokenFakeQuantize(torch.qint8, torch.per_tensor_affine, -128, 127)
    group = QParams(torch.full((8, 2), 0.1), torch.zeros(8, 2, dtype=torch.int32), -8, 7,
                    group_size=32)  # fmt: skip
    channel = QParams(torch.full((8,), 0.1), torch.zeros(8, dtype=torch.int32), -128, 127, axis=0)
    lq_group = linear_quant(x, w, group, spec.per_token_spec())
    lq_channel = linear_quant(x, w, channel, spec.per_token_spec())
    expected = {"1": (False, True), "group": (True, True), "0": (False, False)}
    for mode, (on_group, on_channel) in expected.items():
        monkeypatch.setenv("TRITON_QAT_INT8_FORWARD", mode)
        assert im.int8_forward_applies(w, lq_group) is on_group, mode
        assert im.int8_forward_applies(w, lq_channel) is on_channel, mode
    monkeypatch.delenv("TRITON_QAT_INT8_FORWARD")
    assert not im.int8_forward_applies(w, lq_group)
    assert im.int8_forward_applies(w, lq_channel)
