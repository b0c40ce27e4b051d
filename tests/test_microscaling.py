"""Microscaling fake quant (MXFP8, MXFP4, NVFP4): the reference against torch's casts, an exact
e2m1 oracle and torchao's MX / NVFP4 code (agreements and each documented difference), the
straight-through ops, the quantizer modules and the presets (eager path)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _compare import assert_bitwise_equal

import triton_qat as tq
from triton_qat.numerics.microscaling import (
    MX_FORMATS,
    NVFP4,
    fake_quantize_mx_ref,
    fake_quantize_nvfp4_ref,
    mx_scale_codes_ref,
    mx_scale_ref,
    round_to_e2m1_ref,
)
from triton_qat.ops import fake_quantize_mx, fake_quantize_nvfp4, mx_scale, nvfp4_scales
from triton_qat.quantizers import MXFakeQuantize, NVFP4FakeQuantize

MXFP8, MXFP4 = MX_FORMATS["mxfp8"], MX_FORMATS["mxfp4"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
E2M1_POS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
INF = float("inf")
NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# Oracles, written independently of the reference: float64, frexp, torch's float8 casts, and a
# nearest-value search over the e2m1 grid.


def e2m1_oracle(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value of fp32 v (saturating at 6, ties to the even code), by search."""
    a = v.double().abs().clamp(max=6.0)
    d = (a.unsqueeze(-1) - E2M1_POS).abs()
    nearest = d == d.amin(dim=-1, keepdim=True)
    even = nearest & (torch.arange(8) % 2 == 0)
    pick = torch.where(even.any(-1), even.int().argmax(-1), nearest.int().argmax(-1))
    out = torch.copysign(E2M1_POS[pick], v.double())
    return torch.where(v.isnan(), NAN, out).float()


def mx_oracle(x: torch.Tensor, fmt, block_size: int = 32) -> torch.Tensor:
    """OCP MX v1.0 section 6.3 in float64: X = 2**max(floor(log2 amax) - emax, -127), elements
    by torch's float8_e4m3fn cast (MXFP8) or the e2m1 search (MXFP4), NaN for non-finite blocks."""
    b = x.double().reshape(*x.shape[:-1], -1, block_size)
    amax = b.abs().amax(-1, keepdim=True)
    _, exp = torch.frexp(amax)  # amax = m * 2**exp, m in [0.5, 1)
    s = torch.clamp(exp - 1 - fmt.emax, min=-127).double()
    v = (b / torch.exp2(s)).float()
    if fmt.element == "e4m3":
        q = v.clamp(-448, 448).to(torch.float8_e4m3fn).double()
    else:
        q = e2m1_oracle(v).double()
    y = torch.where(torch.isfinite(amax), q * torch.exp2(s), NAN)
    return y.reshape(x.shape).to(x.dtype)


def grid_values(fmt) -> torch.Tensor:
    """Every non-negative element value of fmt (fp32)."""
    if fmt.element == "e2m1":
        return E2M1_POS.float()
    codes = torch.arange(128, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    values = codes.float()
    return values[torch.isfinite(values)]


def mx_blocks(fmt, dtype=torch.float32, n_blocks: int = 48, seed: int = 0) -> torch.Tensor:
    """(n_blocks, 32) blocks: random with a per-block exponent, ties and their neighbours at the
    block's scale, amax just below / at / above fmax * X (saturation), fp32 subnormals, a zero
    block with signed zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, 32, generator=gen)
    x = x * torch.exp2(torch.randint(-30, 30, (n_blocks, 1), generator=gen).float())
    grid = grid_values(fmt)
    mid = (grid[1:] + grid[:-1]) / 2
    # A block whose scale is 2**s = 1 (amax in [2**emax, 2**(emax+1))): ties are exact midpoints.
    amax = 2.0**fmt.emax
    ties = torch.cat([mid, -mid, torch.nextafter(mid, torch.tensor(INF))])
    for i, start in enumerate(range(0, len(ties), 31)):
        chunk = ties[start : start + 31]
        x[i, : len(chunk)] = chunk
        x[i, 31] = amax
    row = i + 1
    # amax mantissa above fmax's: saturation (7.9 * 2**k in MXFP4, 500 * 2**k in MXFP8).
    for k, m in enumerate([1.0, 1.5, 1.75, 1.76, 1.99999, 1.875]):
        x[row + k, 0] = m * 2.0 ** (fmt.emax + k)
        x[row + k, 1] = -m * 2.0 ** (fmt.emax + k) * 0.97
    row += 6
    x[row] = torch.tensor(1e-40) * torch.arange(32)  # fp32 subnormals
    x[row + 1] = 0.0
    x[row + 1, ::2] = -0.0
    x[row + 2] = x[row + 2] * 2.0**-100  # small, above the e8m0 floor
    return x.to(dtype)


def nvfp4_data(dtype=torch.float32, shape=(8, 64), spread: int = 6, seed: int = 0):
    """Random values with a per-block exponent in [-spread, spread), a zero block, and exact
    e2m1 ties at the largest block's scale."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    exps = torch.randint(-spread, spread, (*shape[:-1], shape[-1] // 16, 1), generator=gen)
    x = (x.reshape(*shape[:-1], -1, 16) * torch.exp2(exps.float())).reshape(shape)
    x[0, :16] = 0.0
    x[0, 16:32] = 0.0
    x[0, 16:32:2] = -0.0
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------
# Elements: e2m1 rounding


def hard_fp32_for_e2m1() -> torch.Tensor:
    grid = torch.cat([-E2M1_POS.flip(0), E2M1_POS]).float()
    mid = (grid[1:] + grid[:-1]) / 2
    near = torch.cat(
        [torch.nextafter(mid, torch.tensor(INF)), torch.nextafter(mid, -torch.tensor(INF))]
    )
    special = torch.tensor([0.0, -0.0, INF, -INF, 6.5, 7.0, -7.9, 1e30, 1e-45, -1e-40, 0.2499])
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(4096, generator=gen) * torch.exp2(
        torch.randint(-8, 5, (4096,), generator=gen)
    )
    return torch.cat([grid, mid, near, special, rand])


def test_e2m1_rounding_matches_the_nearest_even_search():
    v = hard_fp32_for_e2m1()
    assert_bitwise_equal(round_to_e2m1_ref(v), e2m1_oracle(v))
    assert round_to_e2m1_ref(torch.tensor([NAN])).isnan().all()
    # Ties go to the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4,
    # 5 -> 4; saturation: 7 -> 6, -inf -> -6.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -INF, -0.25])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -6.0, -0.0])
    assert_bitwise_equal(round_to_e2m1_ref(ties), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_e2m1_rounding_of_every_16bit_value(dtype):
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    finite = v[torch.isfinite(v) | v.isinf()]
    assert_bitwise_equal(round_to_e2m1_ref(finite), e2m1_oracle(finite))


def test_e2m1_rounding_matches_torchao():
    kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")
    v = hard_fp32_for_e2m1()
    v = v[~v.isinf()]  # torchao's conversion has no special values
    theirs = kernels.f4_unpacked_to_f32(kernels.f32_to_f4_unpacked(v))
    assert_bitwise_equal(round_to_e2m1_ref(v), theirs)


# ---------------------------------------------------------------------------------------------
# MXFP8 / MXFP4 against the spec oracle and torch's casts


@pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=["mxfp8", "mxfp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mx_matches_the_spec_oracle(fmt, dtype):
    x = mx_blocks(fmt, dtype)
    if dtype == torch.float16:
        x = mx_blocks(fmt).clamp(-6e4, 6e4).to(dtype)
    x[-1, 3] = INF
    x[-2, 5] = NAN
    x[-3, 7] = -INF
    y = fake_quantize_mx_ref(x, fmt, 32)
    assert_bitwise_equal(y, mx_oracle(x, fmt))
    assert y[-3:].isnan().all() and not y[:-3].isnan().any()
    # 3D input, blocks of 16: the same blocks, the same numbers.
    x3 = x[:40].reshape(5, -1, 64)
    assert_bitwise_equal(fake_quantize_mx_ref(x3, fmt, 16), mx_oracle(x3, fmt, 16))


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="torch has no float8_e8m0fnu")
@pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=["mxfp8", "mxfp4"])
def test_mx_scales_are_e8m0_values(fmt):
    x = mx_blocks(fmt)
    x[0, 0] = NAN
    x[1, 0] = -INF
    x[2] = 2.0**-140  # below e8m0's floor: 2**-127
    scale = mx_scale_ref(x, fmt, 32)
    codes = mx_scale_codes_ref(x, fmt, 32)
    # torch's e8m0 cast is exact on powers of two and maps NaN to 255.
    cast = scale.to(torch.float8_e8m0fnu)
    assert torch.equal(cast.view(torch.uint8), codes)
    assert_bitwise_equal(cast.float(), scale)
    assert codes[0, 0] == 255 and codes[1, 0] == 255 and codes[2, 0] == 0
    assert scale[2, 0] == 2.0**-127
    # floor(log2 amax) - emax, in float64.
    amax = x[3:].double().abs().amax(-1, keepdim=True)
    expected = torch.clamp(torch.floor(torch.log2(amax)) - fmt.emax, min=-127)
    assert torch.equal(codes[3:].long(), (expected + 127).long())


def test_mx_saturates_when_the_amax_mantissa_exceeds_the_elements():
    # MXFP4: amax 7.9 -> X = 1, 7.9 / 1 clamps to 6 (the spec's clamping of normal numbers).
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([7.9, -7.0, 5.0])
    assert fake_quantize_mx(x, "mxfp4")[0, :3].tolist() == [6.0, -6.0, 4.0]
    x[0, :3] = torch.tensor([500.0, 449.0, 1.0])  # MXFP8: X = 1, 500 -> 448
    assert fake_quantize_mx(x, "mxfp8")[0, :3].tolist() == [448.0, 448.0, 1.0]


# ---------------------------------------------------------------------------------------------
# MX against torchao's to_mx / MXTensor


def torchao_mx(x: torch.Tensor, fmt, mode: str = "FLOOR", block_size: int = 32):
    mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    elem = torch.float8_e4m3fn if fmt.element == "e4m3" else torch.float4_e2m1fn_x2
    t = mx.MXTensor.to_mx(x, elem, block_size, scaling_mode=getattr(ScaleCalculationMode, mode))
    return t.dequantize(x.dtype), t.scale.view(torch.uint8)


@pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=["mxfp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mx_matches_torchao_floor_bit_for_bit(fmt, dtype):
    x = mx_blocks(fmt, dtype)
    x[-2, 4] = NAN  # a NaN block: NaN both ways
    y, codes = torchao_mx(x, fmt)
    ours = fake_quantize_mx(x, fmt.name)
    assert torch.equal(mx_scale_codes_ref(x, fmt, 32), codes)
    # Blocks at e8m0's floor (s = -127: the fp32 subnormal block) differ (documented, tested
    # below); the zero block among them agrees.
    tiny = (codes == 0).squeeze(-1)
    assert tiny.sum() == 2
    assert_bitwise_equal(ours[~tiny], y[~tiny])
    assert_bitwise_equal(ours[x.float().abs().amax(-1) == 0], y[x.float().abs().amax(-1) == 0])
    x3 = x[~tiny][:44].reshape(2, -1, 64)  # leading dims, two blocks a row
    assert_bitwise_equal(fake_quantize_mx(x3, fmt.name), torchao_mx(x3, fmt)[0])


@pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=["mxfp8", "mxfp4"])
def test_torchao_qat_default_rceil_differs_above_the_element_mantissa(fmt):
    qat = pytest.importorskip("torchao.prototype.qat")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    elem = torch.float8_e4m3fn if fmt.element == "e4m3" else torch.float4_e2m1fn_x2
    assert qat.MXFakeQuantizeConfig(dtype=elem).scaling_mode == ScaleCalculationMode.RCEIL
    limit = fmt.fmax / 2.0**fmt.emax  # 1.75 (e4m3), 1.5 (e2m1)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 32, generator=gen) * 0.9
    mantissa = torch.linspace(1.0, 1.999, 64)
    x[:, 0] = mantissa * torch.exp2(torch.randint(-20, 20, (64,), generator=gen).float())
    x[:, 1:] *= x[:, :1]
    ours = fake_quantize_mx(x, fmt.name)
    theirs, their_codes = torchao_mx(x, fmt, "RCEIL")
    codes = mx_scale_codes_ref(x, fmt, 32)[:, 0]
    agree = mantissa <= limit
    assert agree.any() and (~agree).any()
    assert_bitwise_equal(ours[agree], theirs[agree])
    assert torch.equal(codes[agree], their_codes[agree, 0])
    assert torch.equal(codes[~agree].int() + 1, their_codes[~agree, 0].int())
    # RCEIL never saturates; the spec's FLOOR does on those blocks.
    assert (theirs[~agree, 0] == x[~agree, 0]).sum() < (~agree).sum()
    assert torch.all(ours[~agree, 0].abs() == fmt.fmax * mx_scale(x, fmt.name)[~agree, 0])


@pytest.mark.parametrize("fmt", [MXFP8, MXFP4], ids=["mxfp8", "mxfp4"])
def test_torchao_differs_on_inf_and_tiny_blocks(fmt):
    x = torch.ones(2, 32)
    x[0, 0] = INF
    x[0, 1] = 3.0
    x[1] = 2.0 ** (fmt.emax - 127)  # s = -127 exactly: X = 2**-127
    theirs, _ = torchao_mx(x, fmt)
    ours = fake_quantize_mx(x, fmt.name)
    # An inf: here the block is NaN; torchao takes inf's exponent as 128.
    assert ours[0].isnan().all()
    their_x = 2.0 ** (128 - fmt.emax)
    assert theirs[0, 0] == fmt.fmax * their_x and not theirs[0].isnan().any()
    # Tiny blocks: here exact (2**(emax-127) is an element times 2**-127); torchao halves them.
    assert_bitwise_equal(ours[1], x[1])
    assert_bitwise_equal(theirs[1], x[1] / 2)


# ---------------------------------------------------------------------------------------------
# NVFP4


def torchao_nvfp4(x: torch.Tensor, per_tensor_scale: bool = True):
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    s_t = nv.per_tensor_amax_to_scale(torch.max(torch.abs(x))) if per_tensor_scale else None
    t = nv.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=s_t)
    return t.dequantize(x.dtype), t.scale.float(), s_t


def nvfp4_oracle(x: torch.Tensor, per_tensor_scale: bool = True) -> torch.Tensor:
    """The recipe with torch's float8_e4m3fn cast and the e2m1 search; same fp32 steps."""
    xf = x.float().reshape(*x.shape[:-1], -1, 16)
    one = torch.tensor(1.0)
    s_t = x.float().abs().amax().clamp(min=1e-12) / 2688.0 if per_tensor_scale else one
    s_b = ((xf.abs().amax(-1, keepdim=True) / 6.0) / s_t).clamp(max=448)
    s_b = s_b.to(torch.float8_e4m3fn).float()
    r = torch.where(s_b > 0, (1.0 / s_t) / s_b, 0.0)
    y = e2m1_oracle(xf * r) * (s_t * s_b)
    return y.reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_tensor_scale", [True, False])
def test_nvfp4_matches_the_recipe_oracle(dtype, per_tensor_scale):
    x = nvfp4_data(dtype, spread=12)
    x[3, :16] *= 2.0**-14  # a block scale in e4m3's subnormals
    y = fake_quantize_nvfp4(x, per_tensor_scale=per_tensor_scale)
    assert_bitwise_equal(y, nvfp4_oracle(x, per_tensor_scale))
    assert_bitwise_equal(fake_quantize_nvfp4_ref(x, 16, per_tensor_scale), y)
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 64), (2, 4, 48)])
def test_nvfp4_matches_torchao_bit_for_bit(dtype, shape):
    x = nvfp4_data(dtype, shape)
    theirs, their_scales, their_s_t = torchao_nvfp4(x)
    assert_bitwise_equal(fake_quantize_nvfp4(x), theirs)
    s_t, s_b = nvfp4_scales(x)
    assert_bitwise_equal(s_t, their_s_t)
    # Zero blocks: torchao's scale is clamped to 2**-6, here 0; the outputs agree (+-0).
    nonzero = s_b > 0
    assert (~nonzero).any()
    assert_bitwise_equal(s_b[nonzero], their_scales.reshape(s_b.shape)[nonzero])
    # A NaN anywhere: every element NaN, both ways.
    x.view(-1)[5] = NAN
    assert fake_quantize_nvfp4(x).isnan().all() and torchao_nvfp4(x)[0].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_block_scales_only_match_torchao_above_e4m3_normals(dtype):
    x = nvfp4_data(dtype, (8, 64), spread=6) * 8  # most block amax / 6 above 2**-6
    theirs, their_scales, _ = torchao_nvfp4(x, per_tensor_scale=False)
    ours = fake_quantize_nvfp4(x, per_tensor_scale=False)
    _, s_b = nvfp4_scales(x, per_tensor_scale=False)
    normal = s_b >= 2.0**-6
    assert normal.any() and (~normal).any()
    rows = normal.unsqueeze(-1).expand(*s_b.shape, 16).reshape(x.shape)
    assert_bitwise_equal(ours[rows], theirs[rows])
    # Below: torchao clamps the block scale to 2**-6; the recipe keeps e4m3 subnormals (or 0).
    assert torch.all(their_scales.reshape(s_b.shape)[~normal] == 2.0**-6)
    assert torch.all(s_b[~normal] < 2.0**-6)


def test_nvfp4_differences_from_torchao():
    # A block tiny against the tensor's amax: a subnormal e4m3 block scale here, 2**-6 there.
    x = torch.ones(1, 32)
    x[0, 16:] = torch.linspace(1e-5, 3e-5, 16)
    ours, theirs = fake_quantize_nvfp4(x), torchao_nvfp4(x)[0]
    s_t, s_b = nvfp4_scales(x)
    assert s_t == torch.tensor(1.0) / 2688.0
    assert 0 < s_b[0, 1] < 2.0**-6
    assert_bitwise_equal(ours[0, :16], theirs[0, :16])
    assert (ours[0, 16:] - x[0, 16:]).abs().max() < (theirs[0, 16:] - x[0, 16:]).abs().max()
    # A zero tensor: zeros here (amax clamped to eps), NaN in torchao (0 / 0).
    z = torch.zeros(2, 16)
    assert_bitwise_equal(fake_quantize_nvfp4(z), z)
    assert torchao_nvfp4(z)[0].isnan().all()
    # Without the tensor scale, a block with an inf: NaN here, saturated there.
    x[0, 3] = INF
    y = fake_quantize_nvfp4(x, per_tensor_scale=False)
    assert y[0, :16].isnan().all() and not y[0, 16:].isnan().any()
    assert torchao_nvfp4(x, per_tensor_scale=False)[0][0, 3] == 6.0 * 448.0


def test_nvfp4_nonfinite_tensor_is_all_nan():
    x = nvfp4_data()
    x[2, 7] = -INF
    assert fake_quantize_nvfp4(x).isnan().all()
    y = fake_quantize_nvfp4(x, per_tensor_scale=False)  # blocks only: the inf's block
    assert y[2, :16].isnan().all() and y.isnan().sum() == 16


# ---------------------------------------------------------------------------------------------
# The ops: straight-through gradient, dtypes, argument checks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["mxfp8", "mxfp4", "nvfp4"])
def test_straight_through_gradient_and_dtypes(dtype, op):
    x = nvfp4_data(torch.float32, (3, 4, 64)).to(dtype).requires_grad_()
    fq = (
        (lambda t: fake_quantize_nvfp4(t)) if op == "nvfp4" else (lambda t: fake_quantize_mx(t, op))
    )
    y = fq(x)
    assert y.dtype == dtype and y.shape == x.shape
    # Computed in fp32 from the exact upcast, one cast at the end.
    assert_bitwise_equal(y, fq(x.detach().float()).to(dtype))
    dy = torch.randn(3, 4, 64).to(dtype)
    y.backward(dy)
    assert_bitwise_equal(x.grad, dy)
    assert fq(x.detach()[:0]).shape == (0, 4, 64)


def test_argument_errors_name_the_argument():
    x = torch.randn(4, 48)
    with pytest.raises(
        ValueError, match=r"^block_size 32 does not divide the last dim of x \(48\)"
    ):
        fake_quantize_mx(x, "mxfp8")
    with pytest.raises(
        ValueError, match=r"^block_size 32 does not divide the last dim of x \(48\)"
    ):
        fake_quantize_nvfp4(x, 32)
    with pytest.raises(ValueError, match=r"^block_size must be positive"):
        fake_quantize_mx(x, "mxfp4", 0)
    with pytest.raises(TypeError, match=r"^block_size must be an int"):
        fake_quantize_nvfp4(x, 16.0)
    with pytest.raises(TypeError, match=r"^x must be float32"):
        fake_quantize_mx(x.double(), "mxfp8", 16)
    with pytest.raises(TypeError, match=r"^x must be float32"):
        fake_quantize_nvfp4(x.to(torch.int32))
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor"):
        fake_quantize_nvfp4([1.0] * 16)
    with pytest.raises(ValueError, match=r"^x must have at least one dim"):
        fake_quantize_mx(torch.tensor(1.0), "mxfp8", 1)
    with pytest.raises(ValueError, match=r"^fmt must be one of \['mxfp4', 'mxfp8'\]"):
        fake_quantize_mx(x, "mxfp6", 16)
    with pytest.raises(TypeError, match=r"^per_tensor_scale must be a bool"):
        fake_quantize_nvfp4(x, per_tensor_scale=1)
    with pytest.raises(ValueError, match=r"^eps must be positive"):
        fake_quantize_nvfp4(x, eps=0.0)
    with pytest.raises(ValueError, match=r"^fmt must be one of"):
        MXFakeQuantize(fmt="nvfp4")
    with pytest.raises(ValueError, match=r"^block_size must be positive"):
        NVFP4FakeQuantize(block_size=-16)


def test_no_float8_or_float4_dtype_is_needed(monkeypatch):
    x = nvfp4_data()
    expected = [fake_quantize_mx(x, "mxfp8"), fake_quantize_mx(x, "mxfp4"), fake_quantize_nvfp4(x)]
    for name in ("float8_e8m0fnu", "float4_e2m1fn_x2", "float8_e4m3fn"):
        monkeypatch.delattr(torch, name)
    got = [fake_quantize_mx(x, "mxfp8"), fake_quantize_mx(x, "mxfp4"), fake_quantize_nvfp4(x)]
    for a, b in zip(got, expected, strict=True):
        assert_bitwise_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Modules and presets


@pytest.mark.parametrize(
    "fq, op",
    [
        (MXFakeQuantize("mxfp4"), lambda t: fake_quantize_mx(t, "mxfp4")),
        (NVFP4FakeQuantize(), fake_quantize_nvfp4),
    ],
    ids=["mx", "nvfp4"],
)
def test_module_state_dict_flags_and_scales(fq, op):
    assert list(fq.state_dict()) == ["fake_quant_enabled", "observer_enabled"]
    w = nvfp4_data()
    assert_bitwise_equal(fq(w), op(w))
    scales = fq.calculate_qparams(w)
    if isinstance(fq, MXFakeQuantize):
        assert_bitwise_equal(scales, mx_scale(w, "mxfp4"))
    else:
        assert_bitwise_equal(scales[1], nvfp4_scales(w)[1])
    assert fq.qparams() is None
    fq.disable_fake_quant()
    assert fq(w) is w
    other = type(fq)()
    other.load_state_dict(fq.state_dict())
    assert other(w) is w
    assert list(other.to(torch.bfloat16).state_dict()) == list(fq.state_dict())


PRESETS = {
    "mxfp8_dynamic": (MXFakeQuantize, "mxfp8", False),
    "mxfp8_weight_only": (MXFakeQuantize, "mxfp8", True),
    "mxfp4_dynamic": (MXFakeQuantize, "mxfp4", False),
    "mxfp4_weight_only": (MXFakeQuantize, "mxfp4", True),
    "nvfp4_dynamic": (NVFP4FakeQuantize, "nvfp4", False),
    "nvfp4_weight_only": (NVFP4FakeQuantize, "nvfp4", True),
}


def reference_fq(fmt: str, t: torch.Tensor) -> torch.Tensor:
    return fake_quantize_nvfp4(t) if fmt == "nvfp4" else fake_quantize_mx(t, fmt)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_forward_and_gradients_are_fq_then_linear(preset):
    cls, fmt, weight_only = PRESETS[preset]
    model = tq.prepare_qat(mlp(), preset)
    layer = model[0]
    assert type(layer.weight_fake_quant) is cls
    assert layer.weight_fake_quant.block_size == (NVFP4.block_size if fmt == "nvfp4" else 32)
    ifq = getattr(layer, "input_fake_quant", None)
    assert (ifq is None) == weight_only and (weight_only or type(ifq) is cls)
    x = torch.randn(3, 5, 64).requires_grad_()
    # The eager backend: the fused op is the composition itself (the Triton path against it:
    # tests/test_microscaling_kernels.py).
    with warnings.catch_warnings(), tq.use_backend("eager"):
        warnings.simplefilter("error")  # triton_qat's own module: no unfused warning
        y = layer(x)
    xq = x.detach() if weight_only else reference_fq(fmt, x.detach())
    xq.requires_grad_()
    wq = reference_fq(fmt, layer.weight.detach()).requires_grad_()
    expected = F.linear(xq, wq, layer.bias)
    assert_bitwise_equal(y, expected)
    dy = torch.randn_like(y)
    with tq.use_backend("eager"):
        y.backward(dy)
    expected.backward(dy)
    assert_bitwise_equal(x.grad, xq.grad)
    assert_bitwise_equal(layer.weight.grad, wq.grad)


@pytest.mark.parametrize("preset", ["nvfp4_dynamic", "mxfp4_dynamic", "mxfp8_dynamic"])
def test_preset_trains(preset):
    model = tq.prepare_qat(mlp(), preset)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 64, generator=gen)
    target = x @ torch.randn(64, 16, generator=gen) / 8
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    # The eager composition: 30 steps of interpreted kernels take a minute per preset; the
    # Triton path against it: tests/test_microscaling_kernels.py.
    with tq.use_backend("eager"):
        for _ in range(30):
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


def test_k_not_a_multiple_of_the_block_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.Linear(24, 8))
    with pytest.raises(ValueError, match=r"module '1' .*blocks of 16 \(block_size\).* 24 input"):
        tq.prepare_qat(model, "nvfp4_dynamic")
    layer = tq.nn.Linear(24, 8, qconfig="mxfp8_weight_only")  # no prepare: at the first forward
    with pytest.raises(
        ValueError, match=r"^block_size 32 does not divide the last dim of x \(24\)"
    ):
        layer(torch.randn(2, 24))


@pytest.mark.parametrize("preset", ["mxfp8_weight_only", "nvfp4_weight_only"])
def test_convert_says_float_format_embeddings_are_not_supported_yet(preset):
    # Linears convert (tests/test_microscaling_convert.py); embedding tables do not yet.
    model = torch.nn.Sequential(tq.nn.Embedding(10, 32, qconfig=preset))
    model(torch.arange(4))
    with pytest.raises(NotImplementedError, match="float-format embeddings are not converted"):
        tq.convert(model)
