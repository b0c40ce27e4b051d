"""The fused fake-quant linear, tq.fq_linear, against the eager composition
F.linear(fq(x), fq(w).to(x.dtype), b): forward and the straight-through backward, its
torch.library custom ops, torch.compile and its argument checks (NUMERICS.md, "Fused linear").

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, see conftest);
with TRITON_QAT_TEST_DEVICE=cuda they are compiled. Sizes stay small and odd (no multiple of
any block) so the interpreter keeps the file fast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_bitwise_equal, fresh_view
from torch import Tensor

import triton_qat as tq
from triton_qat.ops import functional as ops
from triton_qat.quantizers import DynamicPerTokenFakeQuantize

HALF_DTYPES = [torch.bfloat16, torch.float16]
# Unit roundoff of each half dtype (half an ulp of 1.0).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


# --- building blocks -----------------------------------------------------------------------


def _randn(shape, dtype, device, seed, spread=1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * spread).to(dtype).to(device)


def _weight_qparams(
    gran: str,
    n: int,
    k: int,
    device,
    *,
    group: int | None = None,
    float_zp: bool = False,
    qrange: tuple[int, int] = (-128, 127),
    seed: int = 7,
) -> tq.QParams:
    """Weight qparams whose range clamps a few percent of a randn weight."""
    qmin, qmax = qrange
    g = torch.Generator().manual_seed(seed)
    # Scale so that about qmax - qmin steps cover +-2.5 standard deviations.
    base = 5.0 / (qmax - qmin)
    if gran == "tensor":
        return tq.QParams(base, (qmin + qmax + 1) // 2, qmin, qmax)
    pshape = (n,) if gran == "channel" else (n, k // group)
    scale = (base * (0.5 + torch.rand(pshape, generator=g))).to(device)
    # Zero points in the middle half of the range: clamping happens on both sides.
    lo, hi = (3 * qmin + qmax) // 4, (qmin + 3 * qmax) // 4
    if float_zp:
        zp = lo + torch.rand(pshape, generator=g) * (hi - lo)
    else:
        zp = torch.randint(lo, hi + 1, pshape, generator=g, dtype=torch.int32)
    if gran == "channel":
        return tq.QParams(scale, zp.to(device), qmin, qmax, axis=0)
    return tq.QParams(scale, zp.to(device), qmin, qmax, group_size=group)


def _input_qparams(device, python_numbers: bool = False) -> tq.QParams:
    """Per-tensor int8 qparams with a range of about [-4.0, 3.7]: clamps some of 1.5 * randn."""
    if python_numbers:
        return tq.QParams(0.03, 5, -128, 127)
    scale = torch.tensor([0.03], device=device)
    return tq.QParams(scale, torch.tensor([5], dtype=torch.int32, device=device), -128, 127)


def _fq_weight(w: Tensor, qp: tq.QParams) -> Tensor:
    """Fake-quantized weight through the public elementwise ops (the backend in force)."""
    if qp.granularity == "per_tensor":
        return tq.fake_quantize_per_tensor(w, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max)
    if qp.granularity == "per_channel":
        return tq.fake_quantize_per_channel(
            w, qp.scale, qp.zero_point, qp.axis, qp.quant_min, qp.quant_max
        )
    return tq.fake_quantize_per_group(
        w, qp.scale, qp.zero_point, qp.group_size, qp.quant_min, qp.quant_max
    )


def _fq_input(x: Tensor, qp: tq.QParams | DynamicPerTokenFakeQuantize | None) -> Tensor:
    """Per tensor through the public op; dynamic per token through the eager module."""
    if qp is None:
        return x
    if isinstance(qp, DynamicPerTokenFakeQuantize):
        return qp(x)
    return tq.fake_quantize_per_tensor(x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max)


def _input_spec(qp):
    """What tq.fq_linear takes: a dynamic module's PerTokenQParams, or the QParams as given."""
    return qp.per_token_spec() if isinstance(qp, DynamicPerTokenFakeQuantize) else qp


def _composed(wqp, xqp):
    """The unfused definition: F.linear(fq(x), fq(w).to(x.dtype), b)."""

    def fn(x, w, b):
        bias = None if b is None else b.to(x.dtype)
        return F.linear(_fq_input(x, xqp), _fq_weight(w, wqp).to(x.dtype), bias)

    return fn


def _fused(wqp, xqp):
    spec = _input_spec(xqp)
    return lambda x, w, b: tq.fq_linear(x, w, b, weight_qparams=wqp, input_qparams=spec)


def _run(fn, backend: str, x, w, b, dy, requires=(True, True, True)):
    """fn(x, w, b) and its gradients under `backend`, on fresh leaves: (y, [dx, dw, db]).

    A view (transposed, sliced, expanded) is rebuilt on a fresh copy of its base with the
    same strides, so the kernels see that layout; its gradient is the one flowing into the
    view (retain_grad), in the view's shape."""
    inputs = [fresh_view(t, r) for t, r in zip((x, w, b), requires, strict=True)]
    with tq.use_backend(backend):
        y = fn(*inputs)
        if y.requires_grad:
            y.backward(dy)
    return y.detach(), [None if t is None else t.grad for t in inputs]


def _ste_mask(t: Tensor, fq) -> Tensor:
    """Where the straight-through estimator passes the gradient of fq(t) (eager backend)."""
    t = t.detach().clone().requires_grad_()
    with tq.use_backend("eager"):
        fq(t).backward(torch.ones_like(t))
    return t.grad != 0


def _reference64(x, w, b, dy, wqp, xqp):
    """y, dx, dw, db in float64 from the SAME rounded operands the kernels multiply:
    fq(x) and fq(w).to(x.dtype), and the straight-through masks of x and w."""
    k, n = w.shape[1], w.shape[0]
    with tq.use_backend("eager"), torch.no_grad():
        xq = _fq_input(x, xqp)
        wq = _fq_weight(w, wqp).to(x.dtype).double()
    mask_x = torch.ones_like(x, dtype=torch.bool)
    if xqp is not None:
        mask_x = _ste_mask(x, lambda t: _fq_input(t, xqp))
    mask_w = _ste_mask(w, lambda t: _fq_weight(t, wqp))
    x2 = xq.reshape(-1, k).double()
    dy2 = dy.reshape(-1, n).double()
    y = x2 @ wq.t()
    if b is not None:
        y = y + b.double()
    dx = (dy2 @ wq).reshape(x.shape) * mask_x
    dw = (dy2.t() @ x2) * mask_w
    return y.reshape(dy.shape), dx, dw, dy2.sum(0)


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; 0 when both are zero."""
    a, e = actual.detach().double(), expected.detach().double()
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _assert_rel(actual: Tensor, expected: Tensor, bound: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = _rel_err(actual, expected)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"


def _dy_like(x: Tensor, n: int, dtype: torch.dtype | None = None, seed: int = 99) -> Tensor:
    return _randn((*x.shape[:-1], n), dtype or x.dtype, x.device, seed)


def _check_kernel_against_eager(x, w, b, wqp, xqp, requires=(True, True, True), what=""):
    """The fused Triton kernels (and the fused eager path) against the unfused composition.

    fp32: elementwise rtol = atol = 1e-5. bf16 / fp16: relative error norm against a float64
    product of the same rounded operands, at most the dtype's unit roundoff u. Products of
    two half-precision values are exact in fp32, so the kernel differs from that float64
    product only by its fp32 accumulation order (~K * 2**-24, far below u for these K) and by
    the one rounding of the result to the dtype (relative error <= u per element, so in norm).
    """
    n = w.shape[0]
    dy = _dy_like(x, n)
    y_t, grads_t = _run(_fused(wqp, xqp), "triton", x, w, b, dy, requires)
    y_e, grads_e = _run(_fused(wqp, xqp), "eager", x, w, b, dy, requires)
    assert y_t.dtype == x.dtype and y_t.shape == (*x.shape[:-1], n), what
    names = ("dx", "dw", "db")
    for name, inp, r, g_t, g_e in zip(names, (x, w, b), requires, grads_t, grads_e, strict=True):
        if inp is None or not r:
            assert g_t is None and g_e is None, f"{what} {name}: unexpected gradient"
        else:
            assert g_t.dtype == inp.dtype and g_t.shape == inp.shape, f"{what} {name}"
    if x.dtype == torch.float32:
        y_c, grads_c = _run(_composed(wqp, xqp), "eager", x, w, b, dy, requires)
        for path, y, grads in (("triton", y_t, grads_t), ("eager", y_e, grads_e)):
            torch.testing.assert_close(
                y, y_c, **FP32_TOL, msg=lambda m, p=path: f"{what} {p} y: {m}"
            )
            for name, g, g_c in zip(names, grads, grads_c, strict=True):
                if g_c is not None:
                    torch.testing.assert_close(
                        g, g_c, **FP32_TOL, msg=lambda m, p=path, nm=name: f"{what} {p} {nm}: {m}"
                    )
        return
    u = UNIT_ROUNDOFF[x.dtype]
    refs = _reference64(x, w, b, dy, wqp, xqp)
    _assert_rel(y_t, refs[0], u, f"{what} triton y")
    # The eager F.linear may round the product before adding the bias: two roundings.
    _assert_rel(y_e, refs[0], 2 * u, f"{what} eager y")
    for name, g_t, g_e, ref in zip(names, grads_t, grads_e, refs[1:], strict=True):
        if g_t is not None:
            _assert_rel(g_t, ref, u, f"{what} triton {name}")
            _assert_rel(g_e, ref, 2 * u, f"{what} eager {name}")


# --- kernels against the eager composition --------------------------------------------------

# (M, N, K, weight granularity, group size, weight quant range). M and N are never a multiple
# of a block; K is one only where a group size of 32 or more forces it. With the interpreter's
# 32-wide tiles the group sizes take each way of loading per-group qparams (_weight_params):
# 32 / 64 / 128 one per tile row, 16 one per row and group (K = 80 ends in a tile half past
# the last group), 3 and 48 one per element. N = 64 and K = 64 / 96 take the GEMMs' loops
# without masks (LOOP_EVEN: the dX loop runs over N, the forward's over K).
CASES = [
    (1, 1, 1, "tensor", None, (-128, 127)),
    (17, 33, 70, "tensor", None, (-128, 127)),
    (1, 17, 33, "channel", None, (-128, 127)),
    (70, 17, 33, "channel", None, (0, 255)),
    (33, 17, 96, "group", 32, (-8, 7)),
    (5, 33, 99, "group", 3, (0, 15)),
    (17, 9, 80, "group", 16, (-8, 7)),
    (9, 64, 96, "group", 16, (-8, 7)),
    (33, 64, 64, "channel", None, (-128, 127)),
    (17, 5, 96, "group", 48, (-8, 7)),
    (3, 9, 128, "group", 64, (-128, 127)),
    (9, 3, 128, "group", 128, (0, 15)),
]
CASE_IDS = [f"{m}x{n}x{k}-{gran}{g or ''}" for m, n, k, gran, g, _ in CASES]
# (input fake quant, bias, float weight zero point; per tensor keeps an int one).
VARIANTS = [(True, True, False), (False, False, True), (True, False, True)]
VARIANT_IDS = ["xfq-bias-intzp", "plain-floatzp", "xfq-floatzp"]


def _case_tensors(case, variant, dtype, device, seed=0):
    m, n, k, gran, group, qrange = case
    x_fq, bias, float_zp = variant
    x = _randn((m, k), dtype, device, seed, spread=1.5)
    w = _randn((n, k), dtype, device, seed + 1)
    b = _randn((n,), dtype, device, seed + 2) if bias else None
    wqp = _weight_qparams(gran, n, k, device, group=group, float_zp=float_zp, qrange=qrange)
    xqp = _input_qparams(device, python_numbers=not bias) if x_fq else None
    return x, w, b, wqp, xqp


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fp32_matches_eager_composition(device, case, variant):
    x, w, b, wqp, xqp = _case_tensors(case, variant, torch.float32, device)
    _check_kernel_against_eager(x, w, b, wqp, xqp, what=f"{case} {variant}")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(
    "case,variant",
    [
        (CASES[1], VARIANTS[0]),
        (CASES[3], VARIANTS[2]),
        (CASES[4], VARIANTS[0]),
        (CASES[5], VARIANTS[1]),
        (CASES[11], VARIANTS[2]),
    ],
    ids=["tensor", "channel-floatzp", "group32", "group3-floatzp", "group128-floatzp"],
)
def test_half_precision_within_unit_roundoff(device, case, variant, dtype):
    x, w, b, wqp, xqp = _case_tensors(case, variant, dtype, device)
    _check_kernel_against_eager(x, w, b, wqp, xqp, what=f"{case} {variant} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 33), (33,), (1, 1, 33), (3, 1, 2, 33)])
def test_leading_dims(device, shape, dtype):
    k, n = shape[-1], 17
    x = _randn(shape, dtype, device, 10, spread=1.5)
    w = _randn((n, k), dtype, device, 11)
    b = _randn((n,), dtype, device, 12)
    wqp = _weight_qparams("channel", n, k, device)
    _check_kernel_against_eager(x, w, b, wqp, _input_qparams(device), what=str(shape))


# --- dynamic per-token input (w8a8_dynamic, w4a8_dynamic) -------------------------------------
#
# The input's qparams come from each row's own min / max (a light Triton pass), and the GEMMs
# fake-quantize x per row. Compared with the eager module DynamicPerTokenFakeQuantize followed
# by F.linear with the fake-quantized weight, at the tolerances above.

SYM, AFFINE = torch.per_tensor_symmetric, torch.per_tensor_affine
# (M, N, K, weight granularity, group size, weight quant range, input qscheme).
PER_TOKEN_CASES = [
    (1, 17, 33, "channel", None, (-128, 127), SYM),
    (17, 33, 70, "channel", None, (-128, 127), AFFINE),
    (70, 1, 33, "tensor", None, (-128, 127), SYM),
    (33, 17, 96, "group", 32, (-8, 7), AFFINE),
]
PER_TOKEN_IDS = [
    f"{m}x{n}x{k}-{gran}{g or ''}-{q}"
    for m, n, k, gran, g, _, q in (
        (*c[:6], "sym" if c[6] == SYM else "affine") for c in PER_TOKEN_CASES
    )
]


def _per_token_case(case, dtype, device, x_shape=None):
    m, n, k, gran, group, qrange, qscheme = case
    x = _randn(x_shape or (m, k), dtype, device, 20, spread=1.5)
    w = _randn((n, k), dtype, device, 21)
    b = _randn((n,), dtype, device, 22)
    wqp = _weight_qparams(gran, n, k, device, group=group, qrange=qrange)
    return x, w, b, wqp, DynamicPerTokenFakeQuantize(torch.qint8, qscheme, -128, 127)


@pytest.mark.parametrize("case", PER_TOKEN_CASES, ids=PER_TOKEN_IDS)
def test_per_token_fp32_matches_eager_module(device, case):
    x, w, b, wqp, module = _per_token_case(case, torch.float32, device)
    _check_kernel_against_eager(x, w, b, wqp, module, what=f"{case}")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", PER_TOKEN_CASES[1:4:2], ids=PER_TOKEN_IDS[1:4:2])
def test_per_token_half_precision_within_unit_roundoff(device, case, dtype):
    x, w, b, wqp, module = _per_token_case(case, dtype, device)
    _check_kernel_against_eager(x, w, b, wqp, module, what=f"{case} {dtype}")


def test_per_token_3d_input(device):
    """Tokens are the rows of input.reshape(-1, K): qparams per (batch, position)."""
    x, w, b, wqp, module = _per_token_case(PER_TOKEN_CASES[0], torch.float32, device, (2, 9, 33))
    _check_kernel_against_eager(x, w, b, wqp, module, what="3-D")


def test_per_token_strided_input(device):
    """A transposed input: the qparams pass and the GEMMs read it through its strides."""
    m, k, n = 17, 33, 9
    x = _randn((k, m), torch.float32, device, 23, spread=1.5).t()
    w = _randn((n, k), torch.float32, device, 24)
    wqp = _weight_qparams("channel", n, k, device)
    module = DynamicPerTokenFakeQuantize(torch.qint8, SYM, -128, 127)
    assert not x.is_contiguous()
    _check_kernel_against_eager(x, w, None, wqp, module, what="strided")


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_opcheck_per_token(device, backend):
    spec = tq.PerTokenQParams(-128, 127, symmetric=False)
    x, w, lq = _op_sample(device, "group", False)
    lq = ops.linear_quant(x, w, _weight_qparams("group", 5, 8, device, group=4), spec)
    assert lq.x_per_row and lq.x_scale.shape == (x.shape[0],)
    b = _randn((w.shape[0],), torch.float32, device, 87)
    dy = _randn((x.shape[0], w.shape[0]), torch.float32, device, 88)
    x.requires_grad_()
    w.requires_grad_()
    with tq.use_backend(backend):
        torch.library.opcheck(torch.ops.triton_qat.fq_linear.default, (x, w, b, *ops._op_args(lq)))
        torch.library.opcheck(
            torch.ops.triton_qat.fq_linear_backward.default,
            (dy, x.detach(), w.detach(), *ops._op_args(lq), True, True),
        )


# Strided operands, each built from a contiguous leaf: (x from base, w from base).
LAYOUTS = {
    "x_transposed-w_sliced": (
        lambda base: base.t(),  # base (K, M)
        lambda base: base[:, 1::2],  # base (N, 2K)
        lambda m, k: (k, m),
        lambda n, k: (n, 2 * k),
    ),
    "x_sliced-w_transposed": (
        lambda base: base[::2, 3:],  # base (2M, K + 3)
        lambda base: base.t(),  # base (K, N)
        lambda m, k: (2 * m, k + 3),
        lambda n, k: (k, n),
    ),
    "x3d_transposed-w_rows_sliced": (
        lambda base: base.transpose(1, 2),  # base (2, K, T): x (2, T, K)
        lambda base: base[::3],  # base (3N, K)
        lambda m, k: (2, k, m),
        lambda n, k: (3 * n, k),
    ),
}


@pytest.mark.parametrize("codes", ["", "1"], ids=["in_gemm", "codes"])
@pytest.mark.parametrize("gran", ["channel", "group"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_strided_operands(device, monkeypatch, layout, gran, codes):
    """Views of any strides; "codes": the codes passes read them (TRITON_QAT_CODES=1)."""
    monkeypatch.setenv("TRITON_QAT_CODES", codes)
    m, n, k = 9, 17, 40
    x_view, w_view, x_base_shape, w_base_shape = LAYOUTS[layout]
    x_base = _randn(x_base_shape(m, k), torch.float32, device, 20, spread=1.5)
    w_base = _randn(w_base_shape(n, k), torch.float32, device, 21)
    b_base = _randn((n,), torch.float32, device, 22)
    wqp = _weight_qparams(gran, n, k, device, group=8, float_zp=gran == "group")
    xqp = _input_qparams(device)
    assert not x_view(x_base).is_contiguous() and not w_view(w_base).is_contiguous()

    def fn_of(inner):
        return lambda xb, wb, bb: inner(x_view(xb), w_view(wb), bb)

    dy = _dy_like(x_view(x_base), n)
    y_t, grads_t = _run(fn_of(_fused(wqp, xqp)), "triton", x_base, w_base, b_base, dy)
    y_c, grads_c = _run(fn_of(_composed(wqp, xqp)), "eager", x_base, w_base, b_base, dy)
    torch.testing.assert_close(y_t, y_c, **FP32_TOL)
    for name, g_t, g_c in zip(("dx", "dw", "db"), grads_t, grads_c, strict=True):
        torch.testing.assert_close(g_t, g_c, **FP32_TOL, msg=lambda msg, nm=name: f"{nm}: {msg}")


def test_strided_bias(device):
    """A bias that is a strided view (every other element of a longer vector)."""
    m, n, k = 9, 17, 40
    x = _randn((m, k), torch.float32, device, 23, spread=1.5)
    w = _randn((n, k), torch.float32, device, 24)
    b_base = _randn((2 * n,), torch.float32, device, 25)
    wqp = _weight_qparams("channel", n, k, device)
    dy = _dy_like(x, n)

    def fn_of(inner):
        return lambda xi, wi, bb: inner(xi, wi, bb[::2])

    y_t, grads_t = _run(fn_of(_fused(wqp, None)), "triton", x, w, b_base, dy)
    y_c, grads_c = _run(fn_of(_composed(wqp, None)), "eager", x, w, b_base, dy)
    torch.testing.assert_close(y_t, y_c, **FP32_TOL)
    torch.testing.assert_close(grads_t[2], grads_c[2], **FP32_TOL)


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("x_shape", [(0, 40), (2, 0, 40)])
def test_empty_input(device, backend, x_shape):
    n, k = 9, 40
    x = torch.empty(x_shape, device=device)
    w = _randn((n, k), torch.float32, device, 30)
    b = _randn((n,), torch.float32, device, 31)
    wqp = _weight_qparams("group", n, k, device, group=8)
    dy = torch.empty((*x_shape[:-1], n), device=device)
    y, (dx, dw, db) = _run(_fused(wqp, _input_qparams(device)), backend, x, w, b, dy)
    assert y.shape == (*x_shape[:-1], n)
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(w))
    assert torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("n,k", [(0, 40), (9, 0)], ids=["no_out_features", "no_in_features"])
def test_empty_weight(device, backend, n, k):
    """F.linear's semantics with no out-features (empty y, dx zeros) or no in-features
    (y = the bias broadcast, empty dx and dw)."""
    m = 5
    x = _randn((2, m, k), torch.float32, device, 32)
    w = _randn((n, k), torch.float32, device, 33)
    b = _randn((n,), torch.float32, device, 34)
    wqp = _weight_qparams("channel", n, k, device)
    dy = _randn((2, m, n), torch.float32, device, 35)
    y, (dx, dw, db) = _run(_fused(wqp, _input_qparams(device)), backend, x, w, b, dy)
    y_c, (dx_c, dw_c, db_c) = _run(_composed(wqp, _input_qparams(device)), "eager", x, w, b, dy)
    for name, got, want in (("y", y, y_c), ("dx", dx, dx_c), ("dw", dw, dw_c), ("db", db, db_c)):
        torch.testing.assert_close(got, want, **FP32_TOL, msg=lambda msg, nm=name: f"{nm}: {msg}")


@pytest.mark.parametrize(
    "requires",
    [
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (False, True, True),
        (True, False, True),
        (False, False, False),
    ],
    ids=["x", "w", "b", "w+b", "x+b", "none"],
)
def test_gradients_when_only_some_require_grad(device, requires):
    case, variant = (17, 9, 40, "group", 8, (-8, 7)), (True, True, True)
    x, w, b, wqp, xqp = _case_tensors(case, variant, torch.float32, device, seed=40)
    _check_kernel_against_eager(x, w, b, wqp, xqp, requires=requires, what=str(requires))
    if not any(requires):
        y = tq.fq_linear(x, w, b, weight_qparams=wqp, input_qparams=xqp)
        assert not y.requires_grad and y.grad_fn is None


# --- mixed precision -------------------------------------------------------------------------


@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gran", ["channel", "group"])
def test_fp32_master_weight_with_bf16_input(device, gran, bias_dtype):
    """y, dx in bf16; dw in fp32 (the weight's dtype); db in the bias's dtype. Each within
    bf16's unit roundoff of the float64 product of the same rounded operands, as the eager
    composition F.linear(fq(x), fq(w).to(bf16), b)."""
    m, n, k = 17, 33, 48
    x = _randn((m, k), torch.bfloat16, device, 50, spread=1.5)
    w = _randn((n, k), torch.float32, device, 51)
    b = None if bias_dtype is None else _randn((n,), bias_dtype, device, 52)
    wqp = _weight_qparams(gran, n, k, device, group=16, float_zp=gran == "group")
    xqp = _input_qparams(device)
    _check_kernel_against_eager(x, w, b, wqp, xqp, what=f"{gran} bias {bias_dtype}")
    dy = _dy_like(x, n)
    y_t, (dx_t, dw_t, db_t) = _run(_fused(wqp, xqp), "triton", x, w, b, dy)
    y_c, (dx_c, dw_c, db_c) = _run(_composed(wqp, xqp), "eager", x, w, b, dy)
    assert (y_t.dtype, dx_t.dtype, dw_t.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    # Both within u of the float64 product (test above): within 2u of each other.
    _assert_rel(y_t, y_c, 2 * u, "y vs composition")
    _assert_rel(dx_t, dx_c, 2 * u, "dx vs composition")
    _assert_rel(dw_t, dw_c, 2 * u, "dw vs composition")
    if b is not None:
        assert db_t.dtype == bias_dtype
        _assert_rel(db_t, db_c, 2 * u, "db vs composition")


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_equals_explicit_cast(device, backend, bias):
    """Under autocast(bf16) an fp32 input (and bias) is cast to bf16; the fp32 weight stays
    the master copy, fake-quantized in fp32 and cast after. Same as casting by hand."""
    m, n, k = 9, 17, 40
    x = _randn((3, m, k), torch.float32, device, 60, spread=1.5)
    w = _randn((n, k), torch.float32, device, 61)
    b = _randn((n,), torch.float32, device, 62) if bias else None
    wqp = _weight_qparams("channel", n, k, device)
    xqp = _input_qparams(device)
    dy = _dy_like(x, n, torch.bfloat16)

    def autocast_call(xi, wi, bi):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return tq.fq_linear(xi, wi, bi, weight_qparams=wqp, input_qparams=xqp)

    def explicit_call(xi, wi, bi):
        bi = None if bi is None else bi.to(torch.bfloat16)
        return tq.fq_linear(xi.to(torch.bfloat16), wi, bi, weight_qparams=wqp, input_qparams=xqp)

    y_a, grads_a = _run(autocast_call, backend, x, w, b, dy)
    y_x, grads_x = _run(explicit_call, backend, x, w, b, dy)
    assert y_a.dtype == torch.bfloat16
    assert torch.equal(y_a, y_x)
    for name, g_a, g_x in zip(("dx", "dw", "db"), grads_a, grads_x, strict=True):
        if g_x is not None:
            assert g_a.dtype == torch.float32, name
            assert torch.equal(g_a, g_x), name


# --- straight-through masks ------------------------------------------------------------------


def _torch_mask(t: Tensor, fq) -> Tensor:
    """Straight-through mask from torch's own fake-quant op (an oracle independent of tq)."""
    t = t.detach().float().clone().requires_grad_()
    fq(t).backward(torch.ones_like(t))
    return t.grad != 0


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gran", ["channel", "group"])
def test_straight_through_masks(device, gran, dtype, backend):
    """Elements of x and w outside their quant range get an exactly zero gradient; all others
    a nonzero one."""
    m, n, k, group = 17, 9, 40, 8
    x = _randn((m, k), torch.float32, device, 70, spread=0.5)
    w = _randn((n, k), torch.float32, device, 71, spread=0.1)
    for t, big in ((x, 50.0), (w, 10.0)):  # a few values far outside the range, both signs
        flat = t.view(-1)
        flat[::7] = big
        flat[3::11] = -big
    x, w = x.to(dtype), w.to(dtype)
    xqp = tq.QParams(0.03, 5, -128, 127)
    g = torch.Generator().manual_seed(72)
    pshape = (n,) if gran == "channel" else (n, k // group)
    w_scale = (0.005 + 0.01 * torch.rand(pshape, generator=g)).to(device)
    w_zp = torch.randint(-10, 11, pshape, generator=g, dtype=torch.int32).to(device)
    if gran == "channel":
        wqp = tq.QParams(w_scale, w_zp, -128, 127, axis=0)
        torch_fq_w = lambda t: torch.fake_quantize_per_channel_affine(
            t, w_scale, w_zp, 0, -128, 127
        )
    else:
        wqp = tq.QParams(w_scale, w_zp, -128, 127, group_size=group)
        # Per group is per channel on the (N * K / g, g) view.
        torch_fq_w = lambda t: torch.fake_quantize_per_channel_affine(
            t.reshape(-1, group), w_scale.reshape(-1), w_zp.reshape(-1), 0, -128, 127
        ).reshape(t.shape)
    mask_x = _torch_mask(x, lambda t: torch.fake_quantize_per_tensor_affine(t, 0.03, 5, -128, 127))
    mask_w = _torch_mask(w, torch_fq_w)
    assert (~mask_x).any() and (~mask_w).any(), "nothing clamped: the test tests nothing"
    dy = _dy_like(x, n, seed=73)
    _, (dx, dw, _) = _run(_fused(wqp, xqp), backend, x, w, None, dy, (True, True, False))
    assert torch.count_nonzero(dx[~mask_x]) == 0, "dx nonzero where x was clamped"
    assert torch.count_nonzero(dw[~mask_w]) == 0, "dw nonzero where w was clamped"
    assert torch.equal(dx != 0, mask_x), "dx zero where x was not clamped"
    assert torch.equal(dw != 0, mask_w), "dw zero where w was not clamped"


# --- custom ops: opcheck and torch.compile ---------------------------------------------------


def _op_sample(device, gran: str, x_fq: bool, x=None, w=None):
    m, n, k = 3, 5, 8
    x = _randn((m, k), torch.float32, device, 80, spread=1.5) if x is None else x
    w = _randn((n, k), torch.float32, device, 81) if w is None else w
    wqp = _weight_qparams(gran, n, k, device, group=4, float_zp=gran == "channel")
    xqp = _input_qparams(device) if x_fq else None
    return x, w, ops.linear_quant(x, w, wqp, xqp)


OP_SAMPLES = [("tensor", False, True), ("channel", True, False), ("group", True, True)]


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("gran,x_fq,bias", OP_SAMPLES, ids=[s[0] for s in OP_SAMPLES])
def test_opcheck_fq_linear(device, backend, gran, x_fq, bias):
    x, w, lq = _op_sample(device, gran, x_fq)
    b = _randn((w.shape[0],), torch.float32, device, 82) if bias else None
    x.requires_grad_()
    w.requires_grad_()
    with tq.use_backend(backend):
        torch.library.opcheck(torch.ops.triton_qat.fq_linear.default, (x, w, b, *ops._op_args(lq)))


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=str)
def test_opcheck_fq_linear_backward(device, backend, need):
    x, w, lq = _op_sample(device, "group", True)
    dy = _randn((x.shape[0], w.shape[0]), torch.float32, device, 83)
    args = (dy, x, w, *ops._op_args(lq), *need)
    with tq.use_backend(backend):
        torch.library.opcheck(torch.ops.triton_qat.fq_linear_backward.default, args)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_opcheck_strided_operands(device, backend):
    """fq_linear reshapes a transposed (M, K) input to a non-contiguous view, so the ops see
    strided x and w; their fake (meta) outputs must match the real ones, strides included."""
    x = _randn((8, 3), torch.float32, device, 84).t()
    w = _randn((8, 5), torch.float32, device, 85).t()
    x, w, lq = _op_sample(device, "channel", True, x=x, w=w)
    dy = _randn((3, 5), torch.float32, device, 86)
    with tq.use_backend(backend):
        torch.library.opcheck(
            torch.ops.triton_qat.fq_linear.default, (x, w, None, *ops._op_args(lq))
        )
        torch.library.opcheck(
            torch.ops.triton_qat.fq_linear_backward.default,
            (dy, x, w, *ops._op_args(lq), True, True),
        )


class _FakeQuantLinear(torch.nn.Module):
    """A minimal QAT linear: per-channel weight qparams and input qparams as buffers."""

    def __init__(self, k: int, n: int, device, per_token: bool = False) -> None:
        super().__init__()
        self.per_token = per_token
        self.weight = torch.nn.Parameter(_randn((n, k), torch.float32, device, 90))
        self.bias = torch.nn.Parameter(_randn((n,), torch.float32, device, 91))
        g = torch.Generator().manual_seed(92)
        self.register_buffer("w_scale", (0.01 + 0.02 * torch.rand(n, generator=g)).to(device))
        self.register_buffer("w_zp", torch.randint(-5, 6, (n,), generator=g).int().to(device))
        self.register_buffer("x_scale", torch.tensor([0.03], device=device))
        self.register_buffer("x_zp", torch.tensor([5], dtype=torch.int32, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return tq.fq_linear(
            x,
            self.weight,
            self.bias,
            weight_qparams=tq.QParams(self.w_scale, self.w_zp, -128, 127, axis=0),
            input_qparams=tq.PerTokenQParams(-128, 127, symmetric=True)
            if self.per_token
            else tq.QParams(self.x_scale, self.x_zp, -128, 127),
        )


@pytest.mark.parametrize("per_token", [False, True], ids=["per_tensor_input", "per_token_input"])
def test_torch_compile_fullgraph(device, per_token):
    """fullgraph=True raises on a graph break; aot_eager needs no C++ compiler."""
    torch._dynamo.reset()
    model = _FakeQuantLinear(40, 17, device, per_token)
    x = _randn((2, 9, 40), torch.float32, device, 93, spread=1.5)
    dy = _randn((2, 9, 17), torch.float32, device, 94)
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(dy)
        results.append((y.detach(), xi.grad, model.weight.grad, model.bias.grad))
    for name, got, want in zip(("y", "dx", "dw", "db"), results[1], results[0], strict=True):
        assert got is not None, name
        assert torch.equal(got, want), name
    torch._dynamo.reset()


# --- argument validation ---------------------------------------------------------------------


def _bad_call(
    *,
    x_shape=(4, 8),
    w_shape=(6, 8),
    x_dtype=torch.float32,
    w_dtype=None,
    bias=None,
    wqp=None,
    xqp=None,
    w_device=None,
):
    x = torch.randn(x_shape).to(x_dtype)
    w = torch.randn(w_shape).to(w_dtype or x_dtype)
    if w_device is not None:
        w = w.to(w_device)
    wqp = tq.QParams(0.1, 0, -128, 127) if wqp is None else wqp
    return lambda: tq.fq_linear(x, w, bias, weight_qparams=wqp, input_qparams=xqp)


_S6, _Z6 = torch.full((6,), 0.1), torch.zeros(6, dtype=torch.int32)

BAD_CALLS = {
    "weight_3d": (_bad_call(w_shape=(6, 8, 1)), ValueError, "weight"),
    "weight_1d": (_bad_call(w_shape=(8,)), ValueError, "weight"),
    "k_mismatch": (_bad_call(x_shape=(4, 9)), ValueError, "input"),
    "input_0d": (_bad_call(x_shape=()), ValueError, "input"),
    "fp16_weight_bf16_input": (
        _bad_call(x_dtype=torch.bfloat16, w_dtype=torch.float16),
        TypeError,
        "weight",
    ),
    "int_input": (_bad_call(x_dtype=torch.int32, w_dtype=torch.float32), TypeError, "input"),
    "weight_on_meta": (_bad_call(w_device="meta"), ValueError, "weight"),
    "bias_too_long": (_bad_call(bias=torch.zeros(7)), ValueError, "bias"),
    "bias_2d": (_bad_call(bias=torch.zeros(1, 6)), ValueError, "bias"),
    "bias_fp16": (_bad_call(bias=torch.zeros(6, dtype=torch.float16)), TypeError, "bias"),
    "per_channel_axis_1": (
        _bad_call(
            wqp=tq.QParams(
                torch.full((8,), 0.1), torch.zeros(8, dtype=torch.int32), -128, 127, axis=1
            )
        ),
        ValueError,
        "weight_qparams",
    ),
    "input_per_channel": (
        _bad_call(xqp=tq.QParams(torch.full((4,), 0.1), _Z6[:4], -128, 127, axis=0)),
        ValueError,
        "input_qparams",
    ),
    "input_per_group": (
        _bad_call(
            xqp=tq.QParams(
                torch.full((4, 2), 0.1),
                torch.zeros(4, 2, dtype=torch.int32),
                -128,
                127,
                group_size=4,
            )
        ),
        ValueError,
        "input_qparams",
    ),
    "weight_qparams_tuple": (_bad_call(wqp=(0.1, 0, -128, 127)), TypeError, "weight_qparams"),
    "input_qparams_tuple": (_bad_call(xqp=(0.1, 0, -128, 127)), TypeError, "input_qparams"),
    "group_not_dividing_k": (
        _bad_call(
            x_shape=(4, 33),
            w_shape=(6, 33),
            wqp=tq.QParams(torch.full((6, 1), 0.1), _Z6.view(6, 1), -128, 127, group_size=32),
        ),
        ValueError,
        "group_size",
    ),
    "weight_zero_point_out_of_range": (
        _bad_call(wqp=tq.QParams(_S6, torch.full((6,), 200, dtype=torch.int32), -128, 127, axis=0)),
        ValueError,
        "zero_point",
    ),
    "input_zero_point_out_of_range": (
        _bad_call(xqp=tq.QParams(0.1, -1, 0, 255)),
        ValueError,
        "zero_point",
    ),
    "per_channel_scale_length": (
        _bad_call(wqp=tq.QParams(torch.full((5,), 0.1), _Z6[:5], -128, 127, axis=0)),
        ValueError,
        "scale",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_name_the_argument(name):
    call, exc, word = BAD_CALLS[name]
    for backend in ("triton", "eager"):
        with tq.use_backend(backend), pytest.raises(exc, match=word):
            call()


# --- property: random small problems ---------------------------------------------------------

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the GPU machine may lack hypothesis
    given = None


if given is not None:
    _SIZE = st.one_of(st.just(1), st.integers(1, 40))

    @st.composite
    def _linear_cases(draw):
        gran = draw(st.sampled_from(["tensor", "channel", "group"]))
        group = draw(st.sampled_from([1, 3, 8, 32])) if gran == "group" else None
        k = (group or 1) * draw(st.integers(1, 4)) if group else draw(_SIZE)
        qrange = draw(st.sampled_from([(-128, 127), (0, 255), (-8, 7), (0, 15)]))
        return (
            draw(_SIZE),  # M
            draw(_SIZE),  # N
            k,
            gran,
            group,
            qrange,
            draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
            draw(st.booleans()),  # input fake quant
            draw(st.booleans()),  # bias
            gran != "tensor" and draw(st.booleans()),  # float weight zero point
            draw(st.integers(0, 2**31 - 1)),  # seed
            draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "3-D"])),
            draw(st.booleans()),  # weight transposed (a (K, N) buffer seen as (N, K))
        )

    def _strided_input(layout: str, m: int, k: int, dtype, device, seed: int) -> Tensor:
        """An (m, k) input (or (2, m, k) for "3-D") in the given memory layout."""
        if layout == "transposed":
            return _randn((k, m), dtype, device, seed, spread=1.5).t()
        if layout == "sliced":  # every other column of a wider buffer
            return _randn((m, 2 * k), dtype, device, seed, spread=1.5)[:, ::2]
        if layout == "expanded":  # one row seen m times: stride 0, overlapping
            return _randn((1, k), dtype, device, seed, spread=1.5).expand(m, k)
        if layout == "3-D":
            return _randn((2, m, k), dtype, device, seed, spread=1.5)
        return _randn((m, k), dtype, device, seed, spread=1.5)

    @given(_linear_cases())
    def test_property_kernel_equals_eager(device, case):
        m, n, k, gran, group, qrange, dtype, x_fq, bias, float_zp, seed, x_layout, w_t = case
        x = _strided_input(x_layout, m, k, dtype, device, seed)
        w = (
            _randn((k, n), dtype, device, seed + 1).t()
            if w_t
            else _randn((n, k), dtype, device, seed + 1)
        )
        b = _randn((n,), dtype, device, seed + 2) if bias else None
        wqp = _weight_qparams(
            gran, n, k, device, group=group, float_zp=float_zp, qrange=qrange, seed=seed
        )
        xqp = _input_qparams(device) if x_fq else None
        _check_kernel_against_eager(x, w, b, wqp, xqp, what=str(case))


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_in_place_qparam_update_between_forward_and_backward(device, backend):
    """An observer may update the weight's scale in place before backward (two forwards,
    one backward): the gradient is the one of the forward that ran, as in torch.ao."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 32, generator=g).to(device)
    w = (torch.randn(6, 32, generator=g) * 0.1).to(device)
    scale = torch.full((6,), 0.004, device=device)
    zp = torch.zeros(6, dtype=torch.int32, device=device)
    qp = tq.QParams(scale, zp, -8, 7, axis=0)
    grads = []
    for mutate in (False, True):
        ww = w.clone().requires_grad_()
        with tq.use_backend(backend):
            y = tq.fq_linear(x, ww, weight_qparams=qp)
            if mutate:
                scale.mul_(100.0)
                zp.add_(3)
            y.sum().backward()
            scale.fill_(0.004)
            zp.zero_()
        grads.append(ww.grad)
    assert torch.equal(grads[0], grads[1])


def test_master_weight_grad_rounds_like_the_composition(device):
    """fp32 master weights under a bf16 input: dW is the bf16 product widened, as autograd of
    F.linear(fq(x), fq(w).to(bf16)) gives it (2049 ones sum to 2048 in bf16)."""
    x = torch.ones(2049, 3, dtype=torch.bfloat16, device=device)
    w = torch.ones(2, 3, device=device)
    qp = tq.QParams(0.1, 0, -128, 127)
    out = {}
    for backend in ("triton", "eager"):
        ww = w.clone().requires_grad_()
        with tq.use_backend(backend):
            tq.fq_linear(x, ww, weight_qparams=qp).sum().backward()
        out[backend] = ww.grad
    assert torch.equal(out["triton"], out["eager"])
    assert torch.equal(out["eager"], torch.full_like(w, 2048.0))


# --- operands read as int8 codes (int_matmul.fused_weight_codes / fused_input_codes) --------
#
# From CODES_MIN_ROWS rows the forward and dX GEMMs read W's int8 codes, written by one pass,
# and compute (q - zp) * scale from them: the same fq(w) tiles as quantizing W in the GEMM;
# likewise the forward and dW read a fake-quantized x's codes from CODES_MIN_ROWS output
# features.
# So every output and gradient must be bitwise the in-GEMM path's. TRITON_QAT_CODES=1 takes
# the codes at these small sizes, =0 never.

# (weight granularity, group size, weight quant range, input dtype, weight dtype, input fq).
# Group sizes against the interpreter's 32-wide tiles: 16 whole groups per tile, 32 one group
# per tile row, 48 one qparam per element (see _weight_params).
CODES_CASES = [
    ("tensor", None, (-128, 127), torch.float32, torch.float32, None),
    ("channel", None, (0, 255), torch.float32, torch.float32, "tensor"),
    ("channel", None, (-8, 7), torch.bfloat16, torch.bfloat16, None),
    ("channel", None, (-128, 127), torch.bfloat16, torch.float32, "token"),
    ("tensor", None, (0, 255), torch.float16, torch.float16, "tensor_u8"),
    ("group", 16, (-8, 7), torch.bfloat16, torch.float32, "token"),
    ("group", 32, (0, 15), torch.float32, torch.float32, None),
    ("group", 48, (-128, 127), torch.bfloat16, torch.bfloat16, "tensor"),
]


CODES_IDS = [f"{c[0]}{c[1] or ''}{c[2]}-{c[3]}-{c[5]}" for c in CODES_CASES]


@pytest.mark.parametrize("case", CODES_CASES, ids=CODES_IDS)
def test_weight_codes_are_bitwise_the_in_gemm_fake_quant(device, monkeypatch, case):
    from triton_qat.kernels import int_matmul

    gran, group, qrange, dtype, w_dtype, x_quant = case
    m, n, k = (19, 32, 96) if group else (19, 21, 70)  # loops with and without masks
    x = _randn((m, k), dtype, device, 40, spread=1.5)
    w = _randn((n, k), w_dtype, device, 41)
    w[3, 5], w[4, 6], w[5, 7] = float("nan"), float("inf"), -1e30  # clamp and NaN rules
    x[1, 2], x[2, 3] = float("-inf"), 1e30
    b = _randn((n,), dtype, device, 42)
    wqp = _weight_qparams(gran, n, k, device, group=group, qrange=qrange)
    if x_quant == "token":
        xqp = DynamicPerTokenFakeQuantize(torch.qint8, AFFINE, -128, 127)
        monkeypatch.setenv("TRITON_QAT_INT8_FORWARD", "0")  # the float forward GEMM
    elif x_quant == "tensor_u8":
        xqp = tq.QParams(0.03, 133, 0, 255)  # codes stored shifted by 128
    else:
        xqp = _input_qparams(device) if x_quant else None
    dy = _dy_like(x, n)
    taken: dict[str, list] = {"fused_weight_codes": [], "fused_input_codes": []}
    for name, calls in taken.items():
        real = getattr(int_matmul, name)
        monkeypatch.setattr(
            int_matmul, name, lambda *a, real=real, calls=calls: calls.append(r := real(*a)) or r
        )
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("TRITON_QAT_CODES", mode)
        for calls in taken.values():
            calls.clear()
        results[mode] = _run(_fused(wqp, xqp), "triton", x, w, b, dy)
        # forward and dX ask for W's codes, forward and dW for x's; with "1" they get them
        w_codes, x_codes = taken["fused_weight_codes"], taken["fused_input_codes"]
        assert len(w_codes) == 2 and all((t is not None) == (mode == "1") for t in w_codes)
        x_taken = mode == "1" and bool(x_quant)
        assert len(x_codes) == 2 and all((t is not None) == x_taken for t in x_codes)
    (y0, g0), (y1, g1) = results["0"], results["1"]
    assert_bitwise_equal(y1, y0, "forward")
    for name, a, e in zip(("dx", "dw", "db"), g1, g0, strict=True):
        assert_bitwise_equal(a, e, name)


@pytest.mark.parametrize(
    ("m", "n", "x_quant", "order"),
    [
        (40, 24, "token", ["dW", "dX"]),  # x's codes (M * K) larger: dW first
        (24, 40, "token", ["dX", "dW"]),
        (40, 24, None, ["dX", "dW"]),  # no x codes
    ],
)
def test_backward_runs_the_larger_codes_first(device, monkeypatch, m, n, x_quant, order):
    """fused_backward runs the GEMM whose operand codes are larger first (the backward's peak
    then exceeds the float one by the smaller codes at most), and the order changes no bit."""
    from triton_qat.kernels import int_matmul

    k = 64
    x = _randn((m, k), torch.bfloat16, device, 50, spread=1.5)
    w = _randn((n, k), torch.float32, device, 51)
    b = _randn((n,), torch.bfloat16, device, 52)
    wqp = _weight_qparams("channel", n, k, device)
    xqp = DynamicPerTokenFakeQuantize(torch.qint8, AFFINE, -128, 127) if x_quant else None
    monkeypatch.setenv("TRITON_QAT_INT8_FORWARD", "0")
    dy = _dy_like(x, n)
    ran: list[str] = []
    for name, label in (("fused_grad_input", "dX"), ("fused_grad_weight", "dW")):
        real = getattr(int_matmul, name)
        monkeypatch.setattr(
            int_matmul, name, lambda *a, real=real, label=label: ran.append(label) or real(*a)
        )
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("TRITON_QAT_CODES", mode)
        ran.clear()
        results[mode] = _run(_fused(wqp, xqp), "triton", x, w, b, dy)
        assert ran == order
    for name, a, e in zip(("dx", "dw", "db"), results["1"][1], results["0"][1], strict=True):
        assert_bitwise_equal(a, e, name)


def test_weight_codes_by_row_count(monkeypatch):
    """Without the override, codes from CODES_MIN_ROWS rows, for 8-bit integer zero points."""
    from triton_qat.kernels import int_matmul
    from triton_qat.ops.functional import linear_quant

    monkeypatch.delenv("TRITON_QAT_CODES", raising=False)
    x, w = torch.randn(2, 64), torch.randn(8, 64)
    rows = int_matmul.CODES_MIN_ROWS
    cases = {
        "channel": (_weight_qparams("channel", 8, 64, "cpu"), True),
        "float_zp": (_weight_qparams("channel", 8, 64, "cpu", float_zp=True), False),
        "group": (_weight_qparams("group", 8, 64, "cpu", group=32), True),
        "wide": (_weight_qparams("tensor", 8, 64, "cpu", qrange=(0, 511)), False),
    }
    for name, (wqp, expected) in cases.items():
        lq = linear_quant(x, w, wqp, None)
        assert (int_matmul.fused_weight_codes(w, lq, rows) is not None) == expected, name
        assert int_matmul.fused_weight_codes(w, lq, rows - 1) is None, name
    monkeypatch.setenv("TRITON_QAT_CODES", "0")
    lq = linear_quant(x, w, cases["channel"][0], None)
    assert int_matmul.fused_weight_codes(w, lq, rows) is None


@pytest.mark.parametrize("gran", ["channel", "group"])
def test_opcheck_with_operand_codes(device, monkeypatch, gran):
    """The custom ops' contract (fake implementations, no mutation, autograd registration)
    with both operands read as int8 codes."""
    monkeypatch.setenv("TRITON_QAT_CODES", "1")
    x, w, lq = _op_sample(device, gran, True)
    x.requires_grad_()
    w.requires_grad_()
    dy = _randn((x.shape[0], w.shape[0]), torch.float32, device, 84)
    with tq.use_backend("triton"):
        torch.library.opcheck(
            torch.ops.triton_qat.fq_linear.default, (x, w, None, *ops._op_args(lq))
        )
        args = (dy, x.detach(), w.detach(), *ops._op_args(lq), True, True)
        torch.library.opcheck(torch.ops.triton_qat.fq_linear_backward.default, args)


def test_codes_keep_the_inputs_matmul_precision(device, monkeypatch):
    """With both operands as int8 codes, the forward's tl.dot precision still follows the
    fp32 input (torch's TF32 setting), not the codes' int8 dtype."""
    from triton_qat.kernels import fq_matmul

    monkeypatch.setenv("TRITON_QAT_CODES", "1")
    asked = []
    real = fq_matmul.input_precision
    monkeypatch.setattr(fq_matmul, "input_precision", lambda d: asked.append(d) or real(d))
    x, w, lq = _op_sample(device, "group", True)
    with tq.use_backend("triton"):
        torch.ops.triton_qat.fq_linear(x, w, None, *ops._op_args(lq))
    assert asked == [torch.float32]
