"""FP8 on the Triton path (kernels/float8.py): the fake-quant and codes kernels bit for bit
against the reference (numerics/float_formats.py), the FP8 tensor-core GEMM against float64,
and the fused FP8 linear (tq.fp8_linear, tq.nn.Linear with the fp8 presets) against the
eager composition F.linear(fq8(x), fq8(w), b), forward and straight-through backward.

Matmul tolerances: both sides multiply the same fake-quantized values (or the same codes and
scales), so they differ only in the order of fp32 accumulation (at most K * 2**-24 of
sum |x||w| each) and, for a half output, in one rounding of the result (an ulp of the half
dtype). The FP8 GEMM also skips rounding fq(x) and fq(w) (a product of 4-bit and 24-bit
significands) to the input dtype: one unit roundoff of that dtype per operand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_bitwise_equal

import triton_qat as tq
from triton_qat.numerics.float_formats import (
    FLOAT8_EPS,
    FORMATS,
    choose_scale_float8_ref,
    fake_quantize_float8_dynamic_ref,
    round_to_float8_ref,
)

FMTS = list(FORMATS.values())
IDS = [f.name.removeprefix("float8_") for f in FMTS]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture
def k8(device):
    if device.type == "cpu":
        pytest.importorskip("triton")
    from triton_qat.kernels import float8

    return float8


def spread_rows(shape, dtype, device, seed=0):
    """Rows spanning many binades (subnormal codes, ties, saturation-free maxima), one zero
    row, one row holding NaN and one holding inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 12, shape, generator=g))
    x[1] = 0.0
    x[2, 3] = float("nan")
    x[3, -1] = float("inf")
    x[4, :4] = torch.tensor([-0.0, 1.0625, -1.1875, 2.0**-12])  # ties (e4m3), tiny
    return x.to(dtype).to(device)


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_row", [True, False], ids=["per_row", "per_tensor"])
@pytest.mark.parametrize("k", [37, 300])
@pytest.mark.parametrize("tile", [None, 64], ids=["tile_default", "tile_64"])
def test_fake_quant_kernel_is_the_reference(k8, device, monkeypatch, fmt, dtype, per_row, k, tile):
    """tile 64: programs of 4 rows by K chunks of 16, so 7 rows span two programs (the
    second masked) and each row many chunks (the last masked); the default takes them whole."""
    if tile is not None:
        monkeypatch.setattr(k8, "_TILE", tile)
        assert k8._tile(7, k) == (4, 16)
    x = spread_rows((7, k), dtype, device)
    gran = "per_row" if per_row else "per_tensor"
    expected = fake_quantize_float8_dynamic_ref(x.cpu(), fmt, gran)
    assert_bitwise_equal(k8.fake_quantize_float8(x, fmt, per_row, FLOAT8_EPS).cpu(), expected)
    codes, scale = k8.float8_codes(x, fmt, per_row, FLOAT8_EPS)
    ref_scale = choose_scale_float8_ref(x.cpu(), fmt, gran).reshape(-1)
    assert_bitwise_equal(scale.cpu(), ref_scale, "scale")
    assert codes.dtype == fmt.dtype
    ref_q = round_to_float8_ref(x.cpu().float() / ref_scale.reshape(-1, 1), fmt)
    assert_bitwise_equal(codes.cpu().float(), ref_q, "codes")


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_every_float8_value_and_tie_rounds_as_torch(k8, device, fmt):
    """All representable magnitudes, the midpoints between them (ties to even) and the
    points a quarter step either side, through the kernel with scale 1 (amax = fmax)."""
    grid = torch.arange(256, dtype=torch.uint8).view(fmt.dtype).float()
    pos = grid[torch.isfinite(grid) & (grid >= 0)].unique()
    mid = (pos[1:] + pos[:-1]) / 2
    quarter = (pos[1:] - pos[:-1]) / 4
    v = torch.cat([pos, mid, mid - quarter, mid + quarter])
    v = torch.cat([v, -v])
    row = torch.cat([v, torch.tensor([fmt.fmax])])  # amax = fmax: scale exactly 1
    got = k8.fake_quantize_float8(row[None].to(device), fmt, True, FLOAT8_EPS).cpu()[0]
    assert_bitwise_equal(got, row.to(fmt.dtype).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gran", ["per_tensor", "per_row", "per_token"])
def test_op_dispatches_to_the_kernel_bit_for_bit(device, dtype, gran):
    x = spread_rows((10, 40), dtype, device).reshape(5, 2, 40).requires_grad_()
    with tq.use_backend("triton"):
        y = tq.ops.fake_quantize_float8(x, "e4m3fn", gran)
    with tq.use_backend("eager"):
        expected = tq.ops.fake_quantize_float8(x.detach().cpu(), "e4m3fn", gran)
    assert_bitwise_equal(y.detach().cpu(), expected)
    dy = torch.randn(x.shape, device=device).to(dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert_bitwise_equal(dx, dy)  # straight through


# --- the FP8 GEMM -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_matmul_against_float64(k8, device, fmt, out_dtype, bias):
    m, n, k = 19, 13, 70
    g = torch.Generator().manual_seed(3)
    xc = (torch.randn(m, k, generator=g) * 8).to(fmt.dtype).to(device)
    wc = (torch.randn(n, k, generator=g) * 8).to(fmt.dtype).to(device)
    sx = torch.rand(m, generator=g).add(0.5).to(device)
    sw = torch.rand(n, generator=g).add(0.5).to(device)
    b = torch.randn(n, generator=g).to(out_dtype).to(device) if bias else None
    y = k8.fp8_matmul(xc, sx, wc, sw, b, out_dtype).cpu().double()
    xd, wd = xc.cpu().double(), wc.cpu().double()
    exact = (xd @ wd.t()) * sx.cpu().double()[:, None] * sw.cpu().double()[None, :]
    if b is not None:
        exact = exact + b.cpu().double()
    size = (xd.abs() @ wd.abs().t()) * sx.cpu().double()[:, None] * sw.cpu().double()[None, :]
    # fp32 sums of exact products (K + 3 roundings), then one rounding to out_dtype.
    bound = (k + 3) * 2.0**-24 * size + UNIT_ROUNDOFF[out_dtype] * exact.abs() + 1e-30
    if b is not None:
        bound = bound + UNIT_ROUNDOFF[out_dtype] * b.cpu().double().abs()
    assert ((y - exact).abs() <= bound).all()


# --- the fused FP8 linear ---------------------------------------------------------------------


def _composition(x, w, b, w_gran, x_fmt, x_gran):
    wq = fake_quantize_float8_dynamic_ref(w, FORMATS["float8_e4m3fn"], w_gran).to(x.dtype)
    xq = x if x_fmt is None else fake_quantize_float8_dynamic_ref(x, FORMATS[x_fmt], x_gran)
    return xq, wq, F.linear(xq, wq, None if b is None else b.to(x.dtype))


def _bound(a, bt, k, dtype, extra_operand_rounding=False):
    """Bound on |fused - composition| for a product a @ bt (see the module docstring)."""
    size = a.double().abs() @ bt.double().abs()
    exact = a.double() @ bt.double()
    u = UNIT_ROUNDOFF[dtype]
    bound = (k + 4) * 2.0**-24 * size + 2 * u * exact.abs()
    if extra_operand_rounding:
        bound = bound + 2 * u * size
    return bound + 1e-30


CASES = [
    # (weight granularity, input format or None, input granularity)
    ("per_row", "float8_e4m3fn", "per_token"),
    ("per_tensor", "float8_e4m3fn", "per_tensor"),
    ("per_row", "float8_e5m2", "per_token"),
    ("per_row", None, "per_token"),
]
CASE_IDS = ["w_row-x_token", "w_tensor-x_tensor", "x_e5m2", "weight_only"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tensor_cores", ["1", "0"], ids=["fp8_gemm", "codes_gemm"])
def test_fp8_linear_against_the_composition(device, monkeypatch, case, dtype, tensor_cores):
    monkeypatch.setenv("TRITON_QAT_FP8_FORWARD", tensor_cores)
    w_gran, x_fmt, x_gran = case
    m, n, k = 21, 11, 45  # odd: partial tiles and a partial K step
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, k, generator=g).to(dtype).to(device).requires_grad_()
    w = (torch.randn(n, k, generator=g) * 0.2).to(dtype).to(device).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype).to(device).requires_grad_()
    with tq.use_backend("triton"):
        y = tq.fp8_linear(
            x, w, b, weight_granularity=w_gran, input_dtype=x_fmt, input_granularity=x_gran
        )
    x2 = x.detach().cpu().reshape(m, k)
    xq, wq, expected = _composition(x2, w.detach().cpu(), b.detach().cpu(), w_gran, x_fmt, x_gran)
    fp8_gemm = tensor_cores == "1" and x_fmt == "float8_e4m3fn"
    bound = _bound(xq, wq.t(), k, dtype, extra_operand_rounding=fp8_gemm and dtype != torch.float32)
    bound = bound + 2 * UNIT_ROUNDOFF[dtype] * b.detach().cpu().double().abs()
    diff = (y.detach().cpu().reshape(m, n).double() - expected.double()).abs()
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item()}"
    if not fp8_gemm and dtype == torch.float32:
        # The GEMM reads exact fake-quantized tiles: only the summation order differs.
        assert (diff <= (k + 4) * 2.0**-24 * (xq.abs() @ wq.abs().t()).double() + 1e-30).all()

    dy = torch.randn(3, 7, n, generator=g).to(dtype).to(device)
    with tq.use_backend("triton"):
        dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    dy2 = dy.cpu().reshape(m, n)
    ddx = (dx.cpu().reshape(m, k).double() - (dy2 @ wq).double()).abs()
    assert (ddx <= _bound(dy2, wq, n, dtype)).all(), "dx"
    ddw = (dw.cpu().double() - (dy2.t() @ xq).double()).abs()
    assert (ddw <= _bound(dy2.t(), xq, m, dtype)).all(), "dw"
    assert_bitwise_equal(db.cpu(), dy2.sum(0).to(dtype), "db")


def test_fp8_linear_eager_backend_is_the_composition(device):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 33, generator=g).to(device).requires_grad_()
    w = torch.randn(10, 33, generator=g).to(device).requires_grad_()
    with tq.use_backend("eager"):
        y = tq.fp8_linear(x, w)
        dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    xq, wq, expected = _composition(
        x.detach().cpu(), w.detach().cpu(), None, "per_row", "float8_e4m3fn", "per_token"
    )
    assert_bitwise_equal(y.detach().cpu(), expected)
    assert_bitwise_equal(dx.cpu(), torch.ones(6, 10) @ wq)
    assert_bitwise_equal(dw.cpu(), torch.ones(10, 6) @ xq)


@pytest.mark.parametrize("with_bf16_input", [False, True])
def test_fp32_master_weight(device, with_bf16_input):
    """fp32 weights under a bf16 input: fake-quantized in fp32, cast to bf16; dW is the bf16
    product widened, as the composition's autograd gives."""
    dtype = torch.bfloat16 if with_bf16_input else torch.float32
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 40, generator=g).to(dtype).to(device).requires_grad_()
    w = torch.randn(12, 40, generator=g).to(device).requires_grad_()
    with tq.use_backend("triton"):
        y = tq.fp8_linear(x, w)
        dw = torch.autograd.grad(y, w, torch.ones_like(y))[0]
    assert y.dtype == dtype and dw.dtype == torch.float32
    xq, _, _ = _composition(
        x.detach().cpu(), w.detach().cpu(), None, "per_row", "float8_e4m3fn", "per_token"
    )
    ones = torch.ones(12, 300, dtype=dtype)
    ddw = (dw.cpu().double() - (ones @ xq).float().double()).abs()
    assert (ddw <= _bound(ones, xq, 300, dtype)).all()


@pytest.mark.parametrize("qconfig", ["fp8_dynamic", "fp8_weight_only"])
def test_nn_linear_takes_the_fused_op(device, qconfig):
    torch.manual_seed(0)
    lin = tq.nn.Linear(40, 9, qconfig=qconfig, device=device)
    x = torch.randn(4, 3, 40, device=device)
    with tq.use_backend("triton"):
        y = lin(x)
        expected = tq.fp8_linear(
            x, lin.weight, lin.bias, input_dtype="e4m3fn" if qconfig == "fp8_dynamic" else None
        )
    assert_bitwise_equal(y, expected)
    # With the weight's fake quant disabled the input quantizer still applies, as a module.
    lin.weight_fake_quant.disable_fake_quant()
    with tq.use_backend("eager"):
        y = lin(x.cpu() if device.type == "cpu" else x)
    x_in = lin.input_fake_quant(x) if qconfig == "fp8_dynamic" else x
    assert_bitwise_equal(y, F.linear(x_in, lin.weight, lin.bias))


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("x_fmt", ["float8_e4m3fn", ""])
def test_opcheck_fp8_linear(device, backend, x_fmt):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 24, generator=g).to(device).requires_grad_()
    w = torch.randn(7, 24, generator=g).to(device).requires_grad_()
    b = torch.randn(7, generator=g).to(device)
    args = ("float8_e4m3fn", True, FLOAT8_EPS, x_fmt, True, FLOAT8_EPS)
    with tq.use_backend(backend):
        torch.library.opcheck(torch.ops.triton_qat.fp8_linear.default, (x, w, b, *args))
        dy = torch.randn(5, 7, generator=g).to(device)
        torch.library.opcheck(
            torch.ops.triton_qat.fp8_linear_backward.default,
            (dy, x.detach(), w.detach(), *args, True, True),
        )
        # a converted layer's forward on its stored codes (flow/convert_float8.py)
        codes = (w.detach() * 8).clamp(-448, 448).to(torch.float8_e4m3fn)
        scale = torch.full((7, 1), 0.125, device=device)
        # test_schema compares the inputs before and after with arithmetic that torch's CPU
        # float8 tensors lack; the op's schema declares no mutation (mutates_args=()).
        torch.library.opcheck(
            torch.ops.triton_qat.fp8_linear_codes.default,
            (x.detach(), codes, scale, b, torch.float32, x_fmt, True, FLOAT8_EPS),
            test_utils=(
                "test_faketensor",
                "test_autograd_registration",
                "test_aot_dispatch_dynamic",
            ),
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight_granularity": "per_token"}, "weight_granularity"),
        ({"input_granularity": "per_channel"}, "input_granularity"),
        ({"weight_dtype": torch.int8}, "weight_dtype"),
        ({"input_dtype": "e4m3"}, "input_dtype"),
        ({"weight_eps": 0.0}, "weight_eps"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tq.fp8_linear(torch.randn(2, 8), torch.randn(3, 8), **kwargs)


def test_bad_operands_name_the_argument():
    with pytest.raises(TypeError, match="input"):
        tq.fp8_linear(torch.ones(2, 8, dtype=torch.int32), torch.randn(3, 8))
    with pytest.raises(ValueError, match="input's last dim"):
        tq.fp8_linear(torch.randn(2, 7), torch.randn(3, 8))


@pytest.mark.parametrize(
    ("capability", "runs"), [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)]
)
def test_float8_kernels_need_float8_in_triton(monkeypatch, capability, runs):
    """On a GPU the float8 kernels (codes, fp8_matmul, the GEMMs reading float8 codes) run
    from compute capability 8.9: Ampere's Triton has no e4m3fn (compile_check: "type fp8e4nv
    not supported in this architecture"); there the op is the eager composition."""
    from triton_qat.ops import float_formats

    monkeypatch.setattr(float_formats, "use_triton", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert float_formats._float8_triton(torch.device("cuda", 0)) is runs
    monkeypatch.setattr(float_formats, "use_triton", lambda device: False)
    assert float_formats._float8_triton(torch.device("cuda", 0)) is False
