"""Microscaling on the Triton path (kernels/microscaling.py): the fake-quant and codes kernels
bit for bit against the reference (numerics/microscaling.py), and the fused linear
(tq.mx_linear, tq.nn.Linear with the mxfp8 / mxfp4 / nvfp4 presets) against the eager
composition F.linear(fq(x), fq(w), b), forward and straight-through backward.

Matmul tolerances (as tests/test_float8_kernels.py): the GEMMs read the codes and block
scales, whose c * scale cast to the input dtype is the composition's fq tile bit for bit, so
the two sides multiply the same values and differ only in the order of fp32 accumulation (at
most K * 2**-24 of sum |x||w| each) and, for a half output, in one rounding of the result.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_bitwise_equal
from test_microscaling import mx_blocks, nvfp4_data

import triton_qat as tq
from triton_qat.numerics.microscaling import (
    MX_FORMATS,
    NVFP4,
    fake_quantize_mx_ref,
    fake_quantize_nvfp4_ref,
    mx_scale_ref,
    nvfp4_block_scale_ref,
    nvfp4_tensor_scale_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
INF = float("inf")
NAN = float("nan")


@pytest.fixture
def kmx(device):
    if device.type == "cpu":
        pytest.importorskip("triton")
    from triton_qat.kernels import microscaling

    return microscaling


def reference(x: torch.Tensor, fmt: str, block_size: int, pts: bool = True) -> torch.Tensor:
    if fmt == "nvfp4":
        return fake_quantize_nvfp4_ref(x, block_size, pts)
    return fake_quantize_mx_ref(x, MX_FORMATS[fmt], block_size)


def reference_scales(x: torch.Tensor, fmt: str, block_size: int, pts: bool = True):
    """The fp32 scale per block the codes are multiplied by: 2**s, or s_t * s_b."""
    if fmt != "nvfp4":
        return mx_scale_ref(x, MX_FORMATS[fmt], block_size)
    s_t = nvfp4_tensor_scale_ref(x) if pts else torch.ones(())
    return s_t * nvfp4_block_scale_ref(x, block_size, s_t)


def with_nvfp4_ties(x: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """x (fp32) with the elements of every nonzero block but its largest replaced by e2m1
    ties divided by the block's encode factor r = (1 / s_t) / s_b, and their fp32 neighbours:
    x * r lands on or next to a tie, where the order of r's two divisions and the rounding
    of the product decide the element."""
    x = x.clone()
    s_t = nvfp4_tensor_scale_ref(x)
    s_b = nvfp4_block_scale_ref(x, block_size, s_t)
    r = (1.0 / s_t) / s_b
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5])
    blocks = x.view(*x.shape[:-1], -1, block_size)
    for idx in (s_b > 0).nonzero().tolist():
        block = blocks[tuple(idx)]
        at = (ties / r[tuple(idx)]).float()
        vals = torch.stack([torch.nextafter(at, at * 0), at, torch.nextafter(at, at * 2)])
        vals = vals.reshape(-1) * torch.tensor([1.0, -1.0]).repeat(8)[: vals.numel()]
        keep = block.abs().argmax()
        others = [i for i in range(block_size) if i != keep][: vals.numel()]
        block[others] = vals[: len(others)]
    return x


def adversarial(fmt: str, dtype: torch.dtype, width: int) -> torch.Tensor:
    """Rows of `width`: the reference tests' blocks (MX: ties at scale 1 and their neighbours,
    amax at / above the elements' max, fp32 subnormals, signed zeros, tiny blocks; NVFP4:
    spread exponents, zero blocks, ties), then NaN, +-inf, huge and tiny values."""
    if fmt == "nvfp4":
        x = nvfp4_data(shape=(8, width), spread=12)
        x[3, 5] = 2.0**-126 * 3  # tiny against the tensor's amax: subnormal block scales
        x[4] = torch.linspace(-6.0, 6.0, width) * 2.0**-30
        if dtype == torch.float32:  # half inputs cannot hold the fp32 neighbours
            x = with_nvfp4_ties(x, 16)
    else:
        x = mx_blocks(MX_FORMATS[fmt], n_blocks=48).reshape(-1, width)
        x[-1, 0] = 3.0e38  # huge: the largest shared exponents
        x[-2, 1] = -1.0e-38  # below fp32's normals in a block of its own kind
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    if fmt != "nvfp4":  # NVFP4: a non-finite value makes the whole tensor NaN (below)
        x[0, 2] = NAN
        x[1, -1] = INF
        x[2, 0] = -INF
    return x


FMTS = ["mxfp8", "mxfp4", "nvfp4"]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32, 48])
@pytest.mark.parametrize("tile", [None, 64], ids=["tile_default", "tile_64"])
def test_fake_quant_and_codes_are_the_reference(
    kmx, device, monkeypatch, fmt, dtype, block_size, tile
):
    """tile 64: programs of 4 rows by one block, so the rows (three more: not a multiple of
    4) span several programs, the last masked, and each row one program per block; the
    default takes these few rows in one program."""
    width = 96
    x = adversarial(fmt, dtype, width)
    if tile is not None:
        x = torch.cat([x, x[:3]])
        monkeypatch.setattr(kmx, "_TILE", tile)
        bs_p2 = 1 << (block_size - 1).bit_length()
        assert kmx._tile(x.shape[0], width // block_size, bs_p2) == (4, 1)
    spec = kmx.MicroscalingSpec(fmt, block_size)
    expected = reference(x, fmt, block_size)
    y = kmx.fake_quantize_microscaling(x.to(device), spec).cpu()
    assert_bitwise_equal(y, expected)
    codes, scale = kmx.microscaling_codes(x.to(device), spec)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (x.shape[0], width // block_size)
    assert_bitwise_equal(scale.cpu(), reference_scales(x, fmt, block_size), "scales")
    blocks = codes.cpu().float().reshape(x.shape[0], -1, block_size)
    from_codes = (blocks * scale.cpu()[..., None]).reshape(x.shape).to(dtype)
    assert_bitwise_equal(from_codes, expected, "codes * scales")
    if fmt != "nvfp4":
        assert expected[:3].isnan().any(-1).all()  # the non-finite blocks made it through


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pts", [True, False], ids=["tensor_scale", "block_scales_only"])
def test_nvfp4_kernel_special_tensors(kmx, device, dtype, pts):
    """A NaN or an inf anywhere (per tensor: all NaN; block scales only: the block), a zero
    tensor (eps: zeros, signs kept), a tensor whose amax is fp32's largest and one whose
    amax is tiny (subnormal block scales and quotients below e4m3's)."""
    base = nvfp4_data(shape=(4, 64))
    cases = []
    for special in (NAN, INF, -INF):
        x = base.clone()
        x[1, 20] = special
        cases.append(x)
    zero = torch.zeros(4, 64)
    zero[:, ::3] = -0.0
    cases.append(zero)
    cases.append(base * 2.0**100 if dtype == torch.float32 else base * 2.0**10)
    cases.append(base * 2.0**-100 if dtype == torch.float32 else base * 2.0**-12)
    spec = kmx.MicroscalingSpec("nvfp4", 16, pts)
    for i, x in enumerate(cases):
        x = x.to(dtype)
        got = kmx.fake_quantize_microscaling(x.to(device), spec).cpu()
        assert_bitwise_equal(got, fake_quantize_nvfp4_ref(x, 16, pts), f"case {i}")
    nan_case = kmx.fake_quantize_microscaling(cases[0].to(dtype).to(device), spec).cpu()
    assert nan_case.isnan().all() if pts else nan_case.isnan().sum() == 16


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4"])
def test_every_element_value_and_tie_at_scale_one(kmx, device, fmt):
    """All element magnitudes, the midpoints between them (ties to even) and a quarter step
    either side, in blocks whose amax sets the shared scale to exactly 1."""
    f = MX_FORMATS[fmt]
    if f.element == "e2m1":
        pos = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    else:
        grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        pos = grid.unique()
    mid = (pos[1:] + pos[:-1]) / 2
    quarter = (pos[1:] - pos[:-1]) / 4
    v = torch.cat([pos, mid, mid - quarter, mid + quarter])
    v = torch.cat([v, -v])
    pad = (-v.numel()) % 31
    v = torch.cat([v, torch.zeros(pad)]).reshape(-1, 31)
    amax = torch.full((v.shape[0], 1), 2.0**f.emax)  # in the block: scale 2**0
    x = torch.cat([v, amax], dim=1).reshape(1, -1)
    got = kmx.fake_quantize_microscaling(x.to(device), kmx.MicroscalingSpec(fmt, 32)).cpu()
    assert_bitwise_equal(got, fake_quantize_mx_ref(x, f, 32))
    assert_bitwise_equal(mx_scale_ref(x, f, 32), torch.ones(1, x.shape[1] // 32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FMTS)
def test_ops_dispatch_to_the_kernel_bit_for_bit(device, dtype, fmt):
    x = adversarial(fmt, dtype, 64)[:6].reshape(3, 2, 64).to(device).requires_grad_()
    with tq.use_backend("triton"):
        y = tq.ops.fake_quantize_nvfp4(x) if fmt == "nvfp4" else tq.ops.fake_quantize_mx(x, fmt)
    expected = reference(x.detach().cpu(), fmt, NVFP4.block_size if fmt == "nvfp4" else 32)
    assert_bitwise_equal(y.detach().cpu(), expected)
    dy = torch.randn(x.shape).to(dtype).to(device)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert_bitwise_equal(dx, dy)  # straight through


def test_ops_use_the_reference_while_compiling(monkeypatch):
    """Under torch.compile tracing the kernel is not called (the reference is traceable)."""
    from triton_qat.ops import microscaling as ops_mx

    def refuse(*args):
        raise AssertionError("kernel called while compiling")

    monkeypatch.setattr(ops_mx, "_fake_quantize_kernel", refuse)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(2, 32)
    with tq.use_backend("triton"):
        y = tq.ops.fake_quantize_mx(x, "mxfp4")
    assert_bitwise_equal(y, fake_quantize_mx_ref(x, MX_FORMATS["mxfp4"], 32))


def test_without_float8_kernels_the_ops_are_the_composition(monkeypatch):
    """Where the float8 kernels do not run (ops/float_formats._float8_triton: a GPU below
    compute capability 8.9) the fake quant and the fused linear are the eager reference."""
    from triton_qat.ops import microscaling as ops_mx

    def refuse(*args):
        raise AssertionError("kernel called without float8 kernels")

    monkeypatch.setattr(ops_mx, "_float8_triton", lambda device: False)
    monkeypatch.setattr(ops_mx, "_fake_quantize_kernel", refuse)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 64, generator=g).requires_grad_()
    w = torch.randn(5, 64, generator=g).requires_grad_()
    with tq.use_backend("triton"):
        assert_bitwise_equal(tq.ops.fake_quantize_nvfp4(x), fake_quantize_nvfp4_ref(x, 16))
        y = tq.mx_linear(x, w, weight_format="mxfp4", input_format="nvfp4")
        dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    case = (("mxfp4", 32), ("nvfp4", 16))
    xq, wq, expected = _composition(x.detach(), w.detach(), None, case)
    assert_bitwise_equal(y, expected)
    assert_bitwise_equal(dx, torch.ones(6, 5) @ wq)
    assert_bitwise_equal(dw, torch.ones(5, 6) @ xq)


# --- the fused microscaling linear ------------------------------------------------------------


def _composition(x, w, b, case):
    (w_fmt, w_block), (x_fmt, x_block) = case
    wq = reference(w, w_fmt, w_block).to(x.dtype)
    xq = x if x_fmt is None else reference(x, x_fmt, x_block)
    return xq, wq, F.linear(xq, wq, None if b is None else b.to(x.dtype))


def _bound(a, bt, k, dtype):
    """Bound on |fused - composition| for a product a @ bt (see the module docstring)."""
    size = a.double().abs() @ bt.double().abs()
    exact = a.double() @ bt.double()
    return (k + 4) * 2.0**-24 * size + 2 * UNIT_ROUNDOFF[dtype] * exact.abs() + 1e-30


# ((weight format, block), (input format or None, block)); the interpreter's tiles are 32
# wide along the loop: blocks of 32 fill one, 16 two per tile, 64 span two tiles, 48 are
# gathered per element.
CASES = [
    (("mxfp8", 32), ("mxfp8", 32)),
    (("mxfp4", 32), (None, 0)),
    (("nvfp4", 16), ("nvfp4", 16)),
    (("mxfp4", 64), ("mxfp8", 16)),
    (("nvfp4", 48), ("mxfp4", 48)),
]
CASE_IDS = ["mxfp8", "mxfp4_weight_only", "nvfp4", "w64_x16", "w48_x48"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mx_linear_against_the_composition(device, case, dtype):
    (w_fmt, w_block), (x_fmt, x_block) = case
    m, n, k = 21, 11, 192  # odd rows and cols: partial tiles
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, k, generator=g) * torch.exp2(torch.randint(-6, 6, (3, 7, k), generator=g))
    x = x.to(dtype).to(device).requires_grad_()
    w = (torch.randn(n, k, generator=g) * 0.2).to(dtype).to(device).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype).to(device).requires_grad_()
    kwargs = {
        "weight_format": w_fmt,
        "weight_block_size": w_block,
        "input_format": x_fmt,
        "input_block_size": x_block or None,
    }
    with tq.use_backend("triton"):
        y = tq.mx_linear(x, w, b, **kwargs)
    x2 = x.detach().cpu().reshape(m, k)
    xq, wq, expected = _composition(x2, w.detach().cpu(), b.detach().cpu(), case)
    bound = _bound(xq, wq.t(), k, dtype) + 2 * UNIT_ROUNDOFF[dtype] * b.detach().cpu().abs()
    diff = (y.detach().cpu().reshape(m, n).double() - expected.double()).abs()
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item()}"
    if dtype == torch.float32:
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mx_linear_half_gemm_equals_the_composition_bit_for_bit(device, dtype):
    """With exact products and sums (small integer codes times powers of two, K small), the
    fused GEMM's output must be the composition's to the bit: any tile that differed from the
    fq tile would show."""
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-6, 7, (9, 64), generator=g).float() * 0.5
    w = torch.randint(-6, 7, (5, 64), generator=g).float() * 0.25
    x, w = x.to(dtype).to(device), w.to(dtype).to(device)
    case = (("mxfp4", 32), ("mxfp4", 32))
    with tq.use_backend("triton"):
        y = tq.mx_linear(x, w, weight_format="mxfp4", input_format="mxfp4")
    _, _, expected = _composition(x.cpu(), w.cpu(), None, case)
    assert_bitwise_equal(y.cpu(), expected)


def test_mx_linear_non_finite_blocks(device):
    """A NaN / inf block in the weight makes its output column NaN, one in the input its row
    (and NVFP4's tensor scale the whole tensor), as in the composition; gradients likewise."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, generator=g)
    w = torch.randn(5, 64, generator=g)
    x[2, 40] = NAN
    w[3, 7] = INF
    for case in [(("mxfp8", 32), ("mxfp8", 32)), (("nvfp4", 16), (None, 0))]:
        (w_fmt, _), (x_fmt, _) = case
        xd = x.to(device).requires_grad_()
        wd = w.to(device).requires_grad_()
        with tq.use_backend("triton"):
            y = tq.mx_linear(xd, wd, weight_format=w_fmt, input_format=x_fmt)
            dx, dw = torch.autograd.grad(y, (xd, wd), torch.ones_like(y))
        xq, wq, expected = _composition(x, w, None, case)
        assert torch.equal(y.cpu().isnan(), expected.isnan()), case
        assert torch.equal(dx.cpu().isnan(), (torch.ones(6, 5) @ wq).isnan()), case
        assert torch.equal(dw.cpu().isnan(), (torch.ones(5, 6) @ xq).isnan()), case
        # MX: one row and one column NaN; NVFP4's weight tensor scale: everything
        assert y.cpu().isnan().sum() == (10 if w_fmt == "mxfp8" else 30), case


def test_mx_linear_eager_backend_is_the_composition(device):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 32, generator=g).to(device).requires_grad_()
    w = torch.randn(10, 32, generator=g).to(device).requires_grad_()
    with tq.use_backend("eager"):
        y = tq.mx_linear(x, w, weight_format="nvfp4", input_format="mxfp4")
        dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    case = (("nvfp4", 16), ("mxfp4", 32))
    xq, wq, expected = _composition(x.detach().cpu(), w.detach().cpu(), None, case)
    assert_bitwise_equal(y.detach().cpu(), expected)
    assert_bitwise_equal(dx.cpu(), torch.ones(6, 10) @ wq)
    assert_bitwise_equal(dw.cpu(), torch.ones(10, 6) @ xq)


def test_fp32_master_weight_under_a_bf16_input(device):
    """fp32 weights, bf16 input: fake-quantized in fp32, cast to bf16; dW is the bf16 product
    widened, as the composition's autograd gives."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(70, 64, generator=g).to(torch.bfloat16).to(device).requires_grad_()
    w = torch.randn(12, 64, generator=g).to(device).requires_grad_()
    with tq.use_backend("triton"):
        y = tq.mx_linear(x, w, weight_format="nvfp4", input_format="nvfp4")
        dw = torch.autograd.grad(y, w, torch.ones_like(y))[0]
    assert y.dtype == torch.bfloat16 and dw.dtype == torch.float32
    case = (("nvfp4", 16), ("nvfp4", 16))
    xq, wq, expected = _composition(x.detach().cpu(), w.detach().cpu(), None, case)
    diff = (y.cpu().double() - expected.double()).abs()
    assert (diff <= _bound(xq, wq.t(), 64, torch.bfloat16)).all()
    ones = torch.ones(12, 70, dtype=torch.bfloat16)
    ddw = (dw.cpu().double() - (ones @ xq).float().double()).abs()
    assert (ddw <= _bound(ones, xq, 70, torch.bfloat16)).all()


PRESETS = ["mxfp8_dynamic", "mxfp4_weight_only", "nvfp4_dynamic", "nvfp4_weight_only"]


@pytest.mark.parametrize("qconfig", PRESETS)
def test_nn_linear_takes_the_fused_op(device, monkeypatch, qconfig):
    from triton_qat.nn import linear as nn_linear

    torch.manual_seed(0)
    lin = tq.nn.Linear(64, 9, qconfig=qconfig, device=device)
    wfq = lin.weight_fake_quant
    ifq = getattr(lin, "input_fake_quant", None)
    fmt = "nvfp4" if "nvfp4" in qconfig else qconfig.split("_")[0]
    kwargs = {"weight_format": fmt, "weight_block_size": wfq.block_size, "input_format": None}
    if fmt == "nvfp4":
        kwargs.update(weight_per_tensor_scale=True, weight_eps=wfq.eps)
    if ifq is not None:
        kwargs.update(input_format=fmt, input_block_size=ifq.block_size)
        if fmt == "nvfp4":
            kwargs.update(input_per_tensor_scale=True, input_eps=ifq.eps)
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return tq.mx_linear(*args, **kw)

    monkeypatch.setattr(nn_linear, "mx_linear", spy)
    x = torch.randn(4, 3, 64, device=device)
    with tq.use_backend("triton"):
        y = lin(x)
        expected = tq.mx_linear(x, lin.weight, lin.bias, **kwargs)
    assert calls == [kwargs]
    assert_bitwise_equal(y, expected)
    # With the weight's fake quant disabled the input quantizer still applies, as a module.
    wfq.disable_fake_quant()
    with tq.use_backend("eager"):
        y = lin(x)
    x_in = ifq(x) if ifq is not None else x
    assert_bitwise_equal(y, F.linear(x_in, lin.weight, lin.bias))
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("x_fmt", ["mxfp8", "nvfp4", ""])
def test_opcheck_mx_linear(device, backend, x_fmt):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 32, generator=g).to(device).requires_grad_()
    w = torch.randn(7, 32, generator=g).to(device).requires_grad_()
    b = torch.randn(7, generator=g).to(device)
    x_block = 16 if x_fmt == "nvfp4" else 32
    args = ("mxfp4", 32, True, 1e-12, x_fmt, x_block, True, 1e-12)
    with tq.use_backend(backend):
        torch.library.opcheck(torch.ops.triton_qat.mx_linear.default, (x, w, b, *args))
        dy = torch.randn(5, 7, generator=g).to(device)
        torch.library.opcheck(
            torch.ops.triton_qat.mx_linear_backward.default,
            (dy, x.detach(), w.detach(), *args, True, True),
        )
        # a converted layer's forward on its stored codes (flow/convert_microscaling.py);
        # test_schema compares inputs with arithmetic torch's CPU float8 tensors lack
        codes = (w.detach() * 2).clamp(-6, 6).to(torch.float8_e4m3fn)
        scale = torch.full((7, 1), 0.5, device=device)
        torch.library.opcheck(
            torch.ops.triton_qat.mx_linear_codes.default,
            (x.detach(), codes, scale, b, torch.float32, *args[4:]),
            test_utils=(
                "test_faketensor",
                "test_autograd_registration",
                "test_aot_dispatch_dynamic",
            ),
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"weight_format": "mxfp6"}, "weight_format"),
        ({"input_format": "fp8"}, "input_format"),
        ({"weight_block_size": 24}, r"weight_block_size 24 does not divide in_features \(64\)"),
        ({"input_block_size": 0}, "input_block_size must be positive"),
        ({"input_block_size": 16.0}, "input_block_size must be an int"),
        ({"weight_per_tensor_scale": 1}, "weight_per_tensor_scale"),
        ({"input_eps": 0.0}, "input_eps"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tq.mx_linear(torch.randn(2, 64), torch.randn(3, 64), **kwargs)


def test_bad_operands_name_the_argument():
    with pytest.raises(TypeError, match="input"):
        tq.mx_linear(torch.ones(2, 64, dtype=torch.int32), torch.randn(3, 64))
    with pytest.raises(ValueError, match="input's last dim"):
        tq.mx_linear(torch.randn(2, 32), torch.randn(3, 64))
    with pytest.raises(ValueError, match="x_group_size needs x_codes"):
        pytest.importorskip("triton")
        from triton_qat.kernels.fq_matmul import fq_linear_grad_weight
        from triton_qat.kernels.microscaling import _linear_quant

        dy, x, w = torch.randn(2, 3), torch.randn(2, 32), torch.randn(3, 32)
        fq_linear_grad_weight(
            dy, x, w, _linear_quant(None, 0, None, dy), None, False, x_group_size=16
        )


try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the GPU machine may lack hypothesis
    given = None


if given is not None:

    @st.composite
    def _cases(draw):
        fmt = draw(st.sampled_from(FMTS))
        pts = draw(st.booleans())
        block = draw(st.sampled_from([1, 2, 3, 8, 16, 17, 32, 48]))
        ndim = draw(st.integers(1, 3))
        shape = draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim))
        shape[-1] = block * draw(st.integers(1, 4))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**31 - 1))
        spread = draw(st.integers(0, 60))  # binades spanned by the values
        layout = draw(st.sampled_from(["contiguous", "sliced", "transposed"]))
        specials = draw(st.booleans())  # NaN, +-inf, huge, tiny, signed zeros
        return fmt, pts, block, tuple(shape), dtype, seed, spread, layout, specials

    @given(_cases())
    def test_property_kernel_equals_reference(device, case):
        fmt, pts, block, shape, dtype, seed, spread, layout, specials = case
        g = torch.Generator().manual_seed(seed)
        base_shape = (*shape[:-1], 2 * shape[-1]) if layout == "sliced" else shape
        x = torch.randn(base_shape, generator=g)
        x = x * torch.exp2(torch.randint(-spread - 1, spread + 1, base_shape, generator=g))
        if specials:
            flat = x.view(-1)
            picks = torch.randint(0, flat.numel(), (6,), generator=g)
            flat[picks] = torch.tensor([NAN, INF, -INF, 3e38, 1e-41, -0.0])
        x = x.to(dtype).to(device)
        if layout == "sliced":
            x = x[..., ::2]
        elif layout == "transposed" and x.dim() >= 2:
            x = x.transpose(0, -2).contiguous().transpose(0, -2)  # same shape, other strides
        with tq.use_backend("triton"):
            if fmt == "nvfp4":
                y = tq.ops.fake_quantize_nvfp4(x, block, pts)
            else:
                y = tq.ops.fake_quantize_mx(x, fmt, block)
        assert_bitwise_equal(y.cpu(), reference(x.cpu(), fmt, block, pts))
