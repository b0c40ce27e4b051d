"""The eager reference path is bit-exact with PyTorch's own CPU fake-quant ops.

Every test here runs the public API under the "eager" backend and compares, bit for bit
(signed zeros included), with torch.fake_quantize_per_tensor_affine /
torch.fake_quantize_per_channel_affine on the CPU. Per group has no torch op: it is compared
with torch's per-channel op on x.reshape(-1, group_size), parameters flattened along axis 0.

One documented deviation (triton_qat/reference.py): torch's CPU per-channel kernel casts to
int64 before clamping, so +inf and x / scale >= 2**63 wrap to quant_min there; triton_qat
saturates to quant_max, like torch's per-tensor op. Those elements are checked against the
saturated value instead of torch's per-channel output.
"""

from __future__ import annotations

import math

import pytest
import torch
from _compare import assert_bitwise_equal

import triton_qat as tq
from triton_qat.numerics.qparams import normalize
from triton_qat.numerics.reference import fake_quantize_mask_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# Every (quant_min, quant_max) for 2..8 bits, signed and unsigned.
RANGES = [(-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in range(2, 9)] + [
    (0, 2**b - 1) for b in range(2, 9)
]
RANGE_IDS = [f"s{b}" for b in range(2, 9)] + [f"u{b}" for b in range(2, 9)]

RANGES_16 = [(0, 65535), (-32768, 32767)]

SHAPES = [(7,), (3, 5), (17, 33), (2, 3, 5, 7)]

SPECIALS = [
    float("nan"),
    float("inf"),
    float("-inf"),
    1e30,
    -1e30,
    3e38,
    -3e38,
    1e-40,  # subnormal
    -1e-40,
    1.4e-45,  # smallest subnormal
    -1.4e-45,
    -0.0,
    0.0,
]

TWO_63 = 2.0**63


# --------------------------------------------------------------------------------------------
# helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _zero_points(qmin: int, qmax: int) -> list[int]:
    """Integer zero points across the range, ends included."""
    return sorted({qmin, qmin + 1, (qmin + qmax) // 2, qmax - 1, qmax} & set(range(qmin, qmax + 1)))


def _values(shape, qmin, qmax, scale, zp, gen, dtype=torch.float32) -> torch.Tensor:
    """x such that x / scale covers the quant range past both ends, with ties and noise."""
    n = math.prod(shape)
    k = torch.randint(qmin - zp - 4, qmax - zp + 5, (n,), generator=gen).to(torch.float32)
    frac = torch.rand(n, generator=gen)
    # a third exact integers, a third exact halves (ties), a third random fractions
    pick = torch.randint(0, 3, (n,), generator=gen)
    frac = torch.where(pick == 0, 0.0, torch.where(pick == 1, 0.5, frac))
    x = (k + frac) * scale
    return x.reshape(shape).to(dtype)


def eager_per_tensor(x, scale, zp, qmin, qmax):
    with tq.use_backend("eager"):
        return tq.fake_quantize_per_tensor(x, scale, zp, qmin, qmax)


def eager_per_channel(x, scale, zp, axis, qmin, qmax):
    with tq.use_backend("eager"):
        return tq.fake_quantize_per_channel(x, scale, zp, axis, qmin, qmax)


def eager_per_group(x, scale, zp, group_size, qmin, qmax):
    with tq.use_backend("eager"):
        return tq.fake_quantize_per_group(x, scale, zp, group_size, qmin, qmax)


def _bcast(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _positive_overflow(x, scale, zp, axis) -> torch.Tensor:
    """Where torch's per-channel CPU kernel overflows int64 on the positive side (incl. +inf)."""
    inv = _bcast(torch.reciprocal(scale.float()), x, axis)
    v = x.float() * inv
    if zp.is_floating_point():
        v = v + _bcast(zp.float(), x, axis)
    return v >= TWO_63


def _saturated_value(x, scale, zp, axis, qmax) -> torch.Tensor:
    """(quant_max - zp) * scale broadcast over x, computed as the dequantization does."""
    s = _bcast(scale, x, axis)
    z = _bcast(zp, x, axis)
    if zp.is_floating_point():
        y = ((qmax - z.double()) * s.double()).float()
    else:
        y = (qmax - z).float() * s
    return y.expand(x.shape).to(x.dtype)


def torch_per_channel_expected(x, scale, zp, axis, qmin, qmax) -> torch.Tensor:
    """torch's CPU per-channel op, with triton_qat's documented saturation at +overflow."""
    axis %= x.dim()
    y = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    over = _positive_overflow(x, scale, zp, axis)
    if bool(over.any()):
        y = torch.where(over, _saturated_value(x, scale, zp, axis, qmax), y)
    return y


def torch_per_group(x, scale, zp, group_size, qmin, qmax) -> torch.Tensor:
    x2 = x.reshape(-1, group_size)
    y = torch.fake_quantize_per_channel_affine(x2, scale.reshape(-1), zp.reshape(-1), 0, qmin, qmax)
    return y.reshape(x.shape)


def _channel_params(channels, qmin, qmax, gen, float_zp=False, scale_lo=1e-3, scale_hi=1.0):
    log_s = torch.empty(channels).uniform_(math.log(scale_lo), math.log(scale_hi), generator=gen)
    scale = torch.exp(log_s).to(torch.float32)
    if float_zp:
        zp = torch.empty(channels).uniform_(float(qmin), float(qmax), generator=gen)
        # fractional values, and the exact ends when there is room
        if channels >= 2:
            zp[0], zp[-1] = float(qmin), float(qmax)
        zp = zp.to(torch.float32)
    else:
        zp = torch.randint(qmin, qmax + 1, (channels,), generator=gen, dtype=torch.int32)
        if channels >= 2:
            zp[0], zp[-1] = qmin, qmax
    return scale, zp


def _channel_values(x_shape, axis, scale, zp, qmin, qmax, gen, dtype):
    """Per-channel x covering every channel's range, ties included."""
    axis %= len(x_shape)
    n = math.prod(x_shape)
    k = torch.randint(qmin - qmax - 4, qmax - qmin + 5, (n,), generator=gen).to(torch.float32)
    frac = torch.rand(n, generator=gen)
    pick = torch.randint(0, 3, (n,), generator=gen)
    frac = torch.where(pick == 0, 0.0, torch.where(pick == 1, 0.5, frac))
    x = (k + frac).reshape(x_shape) * _bcast(scale, torch.empty(x_shape), axis)
    return x.to(dtype)


def _exact_x(v: float, scale: float) -> torch.Tensor:
    """An fp32 x with float32(x) * float32(1 / float32(scale)) == v exactly."""
    inv = torch.reciprocal(torch.tensor(scale, dtype=torch.float32))
    target = torch.tensor(v, dtype=torch.float32)
    x = target / inv
    for _ in range(8):
        p = x * inv
        if p == target:
            return x
        x = torch.nextafter(x, torch.tensor(math.inf if p < target else -math.inf))
    raise AssertionError(f"no fp32 x with x * inv == {v} for scale {scale}")


# --------------------------------------------------------------------------------------------
# per tensor


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("qmin", "qmax"), RANGES, ids=RANGE_IDS)
def test_per_tensor_all_ranges_and_zero_points(qmin, qmax, dtype):
    gen = _gen(qmax * 1000 + qmin)
    for i, zp in enumerate(_zero_points(qmin, qmax)):
        for scale in (0.1, 0.0371, 1.0, 2.5):
            shape = SHAPES[i % len(SHAPES)]
            x = _values(shape, qmin, qmax, scale, zp, gen, dtype)
            expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
            got = eager_per_tensor(x, scale, zp, qmin, qmax)
            assert_bitwise_equal(got, expected, f"per tensor zp={zp} scale={scale}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_per_tensor_tensor_qparams(shape, dtype):
    """scale as a float32 tensor and zero point as an int32 tensor, as torch's tensor overload."""
    gen = _gen(sum(shape))
    qmin, qmax = -128, 127
    for zp in (-128, -3, 0, 127):
        scale_t = torch.tensor([0.0537], dtype=torch.float32)
        zp_t = torch.tensor([zp], dtype=torch.int32)
        x = _values(shape, qmin, qmax, 0.0537, zp, gen, dtype)
        expected = torch.fake_quantize_per_tensor_affine(x, scale_t, zp_t, qmin, qmax)
        got = eager_per_tensor(x, scale_t, zp_t, qmin, qmax)
        assert_bitwise_equal(got, expected, f"per tensor, tensor qparams zp={zp}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("qmin", "qmax"), RANGES_16, ids=["u16", "s16"])
def test_per_tensor_16_bit_ranges(qmin, qmax, dtype):
    gen = _gen(7)
    for zp in _zero_points(qmin, qmax):
        for scale in (1e-3, 0.1, 3.0):
            x = _values((17, 33), qmin, qmax, scale, zp, gen, dtype)
            x = torch.cat([x.flatten(), torch.tensor(SPECIALS, dtype=dtype)])
            expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
            got = eager_per_tensor(x, scale, zp, qmin, qmax)
            assert_bitwise_equal(got, expected, f"16-bit range zp={zp} scale={scale}")


TIES = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -3.5, 126.5, -127.5]


def _ties_x(dtype, scale: float) -> torch.Tensor:
    """x with x * inv exactly on ties (power-of-two scale) and their neighbours in `dtype`."""
    t = torch.tensor(TIES, dtype=torch.float32) * scale
    t = t.to(dtype)
    up = torch.nextafter(t, torch.full_like(t, math.inf))
    down = torch.nextafter(t, torch.full_like(t, -math.inf))
    return torch.cat([t, up, down])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale", [1.0, 0.125, 4.0, 2.0**-10])
@pytest.mark.parametrize("zp", [0, 1, -1, 3, -128, 127])
def test_per_tensor_ties_and_neighbours(dtype, scale, zp):
    x = _ties_x(dtype, scale)
    qmin, qmax = -128, 127
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    got = eager_per_tensor(x, scale, zp, qmin, qmax)
    assert_bitwise_equal(got, expected, f"ties scale={scale} zp={zp}")


def test_per_tensor_ties_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], dtype=torch.float32)
    got = eager_per_tensor(x, 1.0, 0, -128, 127)
    want = torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, -2.0])
    # -0.5 rounds to -0.0; (q - 0) * 1 keeps the sign, as torch does
    assert_bitwise_equal(got, torch.fake_quantize_per_tensor_affine(x, 1.0, 0, -128, 127))
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_tensor_just_below_half(dtype):
    below = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)).item()  # 0.49999997f
    x = torch.tensor([below, -below, 0.49999997, -0.49999997, 1.4999999, 2.4999998], dtype=dtype)
    expected = torch.fake_quantize_per_tensor_affine(x, 1.0, 0, -128, 127)
    got = eager_per_tensor(x, 1.0, 0, -128, 127)
    assert_bitwise_equal(got, expected, "just below 0.5")
    if dtype == torch.float32:
        assert got[0].item() == 0.0 and got[1].item() == 0.0
    # the same product reached through a non-power-of-two scale
    for scale in (0.1, 0.0371, 3.0):
        xs = _exact_x(below, scale).reshape(1)
        xs = torch.cat([xs, -xs])
        assert_bitwise_equal(
            eager_per_tensor(xs, scale, 0, -128, 127),
            torch.fake_quantize_per_tensor_affine(xs, scale, 0, -128, 127),
            f"x * inv = 0.49999997, scale {scale}",
        )


def test_per_tensor_reciprocal_multiply_trap():
    x = torch.tensor([-11.15, 11.15], dtype=torch.float32)
    expected = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)
    got = eager_per_tensor(x, 0.1, 0, -128, 127)
    assert_bitwise_equal(got, expected, "x=-11.15 scale=0.1")
    # x * (1 / scale) rounds to -112 (x / scale would give -111)
    want = torch.tensor([-112.0, 112.0]) * torch.tensor(0.1, dtype=torch.float32)
    assert_bitwise_equal(got, want, "-11.15 -> -11.2")


def test_per_tensor_range_edges_int8_scale_001():
    scale, qmin, qmax = 0.01, -128, 127
    x = torch.stack([_exact_x(v, scale) for v in (127.5, -128.5, 126.5, -127.5, 128.5, -129.5)])
    expected, t_mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(
        x, scale, 0, qmin, qmax
    )
    got = eager_per_tensor(x, scale, 0, qmin, qmax)
    assert_bitwise_equal(got, expected, "range edges")
    s = torch.tensor(scale, dtype=torch.float32)
    want = torch.tensor([127.0, -128.0, 126.0, -128.0, 127.0, -128.0]) * s
    assert_bitwise_equal(got, want, "range edge values")
    mask = fake_quantize_mask_ref(x, normalize(x, tq.QParams(scale, 0, qmin, qmax)))
    assert_bitwise_equal(mask, t_mask, "range edge mask vs torch")
    assert mask.tolist() == [False, True, True, True, False, False]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (0, 255), (0, 15), *RANGES_16])
def test_per_tensor_special_values(dtype, qmin, qmax):
    x = torch.tensor(SPECIALS, dtype=dtype)
    for zp in _zero_points(qmin, qmax):
        for scale in (0.1, 1.0, 1e-3):
            expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
            got = eager_per_tensor(x, scale, zp, qmin, qmax)
            assert_bitwise_equal(got, expected, f"specials zp={zp} scale={scale}")
    # the documented landing points: NaN -> qmin, +inf -> qmax, -inf -> qmin
    got = eager_per_tensor(x, 1.0, 0, qmin, qmax)
    want = torch.tensor([qmin, qmax, qmin], dtype=torch.float32).to(dtype)
    assert_bitwise_equal(got[:3], want, "NaN -> qmin, +inf -> qmax, -inf -> qmin")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "scale", [0.0, 1e-45, 1e-40, 1e-38, 1e-30, 1e-10, 1e10, 1e30, 3e38, 3.4028235e38]
)
def test_per_tensor_extreme_scales(dtype, scale):
    gen = _gen(3)
    x = torch.cat(
        [
            torch.randn(40, generator=gen) * 100,
            torch.randn(20, generator=gen) * 1e-38,
            torch.tensor(SPECIALS),
        ]
    ).to(dtype)
    for qmin, qmax, zp in ((-128, 127, 0), (-128, 127, -5), (0, 255, 128), (0, 65535, 7)):
        expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        got = eager_per_tensor(x, scale, zp, qmin, qmax)
        assert_bitwise_equal(got, expected, f"scale={scale} zp={zp} [{qmin},{qmax}]")


def test_per_tensor_scale_zero_gives_signed_zeros():
    x = torch.tensor([-3.0, -0.0, 0.0, 2.0, float("nan"), float("inf"), float("-inf")])
    got = eager_per_tensor(x, 0.0, 0, -128, 127)
    assert_bitwise_equal(got, torch.fake_quantize_per_tensor_affine(x, 0.0, 0, -128, 127))
    assert (got == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_tensor_non_contiguous(dtype):
    gen = _gen(11)
    base = (torch.randn(17, 33, generator=gen) * 5).to(dtype)
    views = {
        "transposed": base.t(),
        "step": base[::2, 1::3],
        "neg_last_stride_like": base.t()[::3],
        "expanded": base[:, :1].expand(17, 9),
        "4d_permuted": (torch.randn(2, 3, 5, 7, generator=gen) * 5).to(dtype).permute(3, 1, 0, 2),
    }
    for name, x in views.items():
        assert not x.is_contiguous(), name
        expected = torch.fake_quantize_per_tensor_affine(x, 0.05, 3, -128, 127)
        got = eager_per_tensor(x, 0.05, 3, -128, 127)
        assert_bitwise_equal(got, expected, f"per tensor {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 2)], ids=str)
def test_per_tensor_empty(shape, dtype):
    x = torch.empty(shape, dtype=dtype)
    expected = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)
    got = eager_per_tensor(x, 0.1, 0, -128, 127)
    assert_bitwise_equal(got, expected, f"empty {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_tensor_zero_dim(dtype):
    for v in (1.23, -11.15, 0.5, -0.0, float("nan"), float("inf"), 1e30):
        x = torch.tensor(v, dtype=dtype)
        expected = torch.fake_quantize_per_tensor_affine(x, 0.1, 2, -128, 127)
        got = eager_per_tensor(x, 0.1, 2, -128, 127)
        assert got.dim() == 0
        assert_bitwise_equal(got, expected, f"0-dim {v}")


# --------------------------------------------------------------------------------------------
# per channel

CHANNEL_CASES = [
    ((7,), 0),
    ((7,), -1),
    ((3, 5), 0),
    ((3, 5), 1),
    ((3, 5), -1),
    ((3, 5), -2),
    ((17, 33), 0),
    ((17, 33), 1),
    ((2, 3, 5, 7), 0),
    ((2, 3, 5, 7), 1),
    ((2, 3, 5, 7), 2),
    ((2, 3, 5, 7), 3),
    ((2, 3, 5, 7), -1),
    ((2, 3, 5, 7), -3),
]
CHANNEL_IDS = [f"{s}-ax{a}" for s, a in CHANNEL_CASES]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("qmin", "qmax"), RANGES, ids=RANGE_IDS)
def test_per_channel_all_ranges_int_zp(qmin, qmax, dtype):
    gen = _gen(qmax * 7 + qmin)
    for shape, axis in CHANNEL_CASES[::3] + [((2, 3, 5, 7), -1)]:
        c = shape[axis]
        scale, zp = _channel_params(c, qmin, qmax, gen)
        x = _channel_values(shape, axis, scale, zp, qmin, qmax, gen, dtype)
        expected = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)
        got = eager_per_channel(x, scale, zp, axis, qmin, qmax)
        assert_bitwise_equal(got, expected, f"per channel {shape} axis={axis} zp={zp.tolist()}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("qmin", "qmax"), RANGES, ids=RANGE_IDS)
def test_per_channel_all_ranges_float_zp(qmin, qmax, dtype):
    gen = _gen(qmax * 13 + qmin + 1)
    for shape, axis in CHANNEL_CASES[1::3] + [((17, 33), 1)]:
        c = shape[axis]
        scale, zp = _channel_params(c, qmin, qmax, gen, float_zp=True)
        x = _channel_values(shape, axis, scale, zp, qmin, qmax, gen, dtype)
        expected = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)
        got = eager_per_channel(x, scale, zp, axis, qmin, qmax)
        assert_bitwise_equal(got, expected, f"per channel float zp {shape} axis={axis}")


@pytest.mark.parametrize("float_zp", [False, True], ids=["int_zp", "float_zp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("shape", "axis"), CHANNEL_CASES, ids=CHANNEL_IDS)
def test_per_channel_shapes_and_axes(shape, axis, dtype, float_zp):
    gen = _gen(len(shape) * 100 + axis)
    qmin, qmax = -128, 127
    scale, zp = _channel_params(shape[axis], qmin, qmax, gen, float_zp=float_zp)
    x = _channel_values(shape, axis, scale, zp, qmin, qmax, gen, dtype)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)
    got = eager_per_channel(x, scale, zp, axis, qmin, qmax)
    assert_bitwise_equal(got, expected, f"per channel {shape} axis={axis}")


@pytest.mark.parametrize(("qmin", "qmax"), RANGES_16, ids=["u16", "s16"])
@pytest.mark.parametrize("float_zp", [False, True], ids=["int_zp", "float_zp"])
def test_per_channel_16_bit_ranges(qmin, qmax, float_zp):
    gen = _gen(5)
    scale, zp = _channel_params(17, qmin, qmax, gen, float_zp=float_zp, scale_lo=1e-4)
    x = _channel_values((17, 33), 0, scale, zp, qmin, qmax, gen, torch.float32)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, qmin, qmax)
    got = eager_per_channel(x, scale, zp, 0, qmin, qmax)
    assert_bitwise_equal(got, expected, "per channel 16 bit")


@pytest.mark.parametrize("zp_dtype", [torch.float16, torch.bfloat16])
def test_half_zero_point_is_refused(zp_dtype):
    """torch rounds twice with a float16 zero point (once with float32, on vectorized builds),
    and refuses bfloat16: triton_qat takes float zero points as float32 only."""
    x = torch.zeros(4, 3)
    scale = torch.full((4,), 0.1)
    zp = torch.zeros(4, dtype=zp_dtype)
    with pytest.raises(TypeError, match="zero_point"):
        eager_per_channel(x, scale, zp, 0, -128, 127)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale_v", [1.0, 0.125, 2.0**-10])
def test_per_channel_ties_int_and_float_zp(dtype, scale_v):
    """Integer zp is added after rounding, float zp before: ties tell the two apart."""
    x_row = _ties_x(dtype, scale_v)
    zps_int = [0, 1, -1, 3, -128, 127]
    x = x_row.unsqueeze(0).expand(len(zps_int), -1).contiguous()
    scale = torch.full((len(zps_int),), scale_v, dtype=torch.float32)
    zp = torch.tensor(zps_int, dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, -128, 127)
    assert_bitwise_equal(eager_per_channel(x, scale, zp, 0, -128, 127), expected, "int zp ties")
    # float zero points that move the tie: 0.25 + 0.25 = 0.5, 0.5 + 1.0 = 1.5, ...
    zps_f = [0.0, 0.25, -0.25, 0.5, -0.5, 1.0, 2.5, -127.5]
    xf = x_row.unsqueeze(0).expand(len(zps_f), -1).contiguous()
    scale = torch.full((len(zps_f),), scale_v, dtype=torch.float32)
    zpf = torch.tensor(zps_f, dtype=torch.float32)
    expected = torch.fake_quantize_per_channel_affine(xf, scale, zpf, 0, -128, 127)
    assert_bitwise_equal(eager_per_channel(xf, scale, zpf, 0, -128, 127), expected, "float ties")
    # 0.25 + 0.25: x * inv + zp is exactly 0.5 -> rounds to 0 -> (0 - 0.25) * scale
    xq = torch.full((1, 1), 0.25 * scale_v, dtype=dtype)
    got = eager_per_channel(xq, torch.tensor([scale_v]), torch.tensor([0.25]), 0, -128, 127)
    assert got.float().item() == -0.25 * scale_v


def test_per_channel_reciprocal_trap_and_range_edges():
    scale = torch.tensor([0.1, 0.01, 0.01, 0.01], dtype=torch.float32)
    zp = torch.zeros(4, dtype=torch.int32)
    x = torch.stack(
        [
            torch.tensor(-11.15, dtype=torch.float32),
            _exact_x(127.5, 0.01),
            _exact_x(-128.5, 0.01),
            _exact_x(126.5, 0.01),
        ]
    ).reshape(4, 1)
    expected, t_mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
        x, scale, zp, 0, -128, 127
    )
    got = eager_per_channel(x, scale, zp, 0, -128, 127)
    assert_bitwise_equal(got, expected, "per channel trap / edges")
    mask = fake_quantize_mask_ref(x, normalize(x, tq.QParams(scale, zp, -128, 127, axis=0)))
    assert_bitwise_equal(mask, t_mask, "per channel mask")
    assert mask.flatten().tolist() == [True, False, True, True]


def test_per_channel_float_zp_product_not_rounded_before_zero_point():
    """Float zero point: torch's CPU kernel evaluates lrintf(zero_point + x * inv_scale). Its
    AVX2 / AVX512 builds (the default dispatch on x86-64) contract that into one fma, so the
    product is NOT rounded to fp32 before zp is added; its DEFAULT build rounds it. Here
    fp32(x * inv) is exactly 2.5 / 1.5 / 0.5 / -0.5 while the exact product is not, and zp moves
    the value onto a tie: the two evaluations round differently. The reference must equal torch
    as dispatched on this machine (torch.backends.cpu.get_cpu_capability())."""
    x = torch.tensor(
        [[0.19583693146705627, 0.11750215291976929, 0.11750216037034988, 0.039167385548353195]]
    )
    x = torch.cat([x, -x], dim=1)
    scale = torch.tensor([0.07833477109670639])
    for zp_v in (-2.0, -1.0, 1.0, 2.0, 0.0):
        zp = torch.tensor([zp_v])
        expected, t_mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
            x, scale, zp, 0, -128, 127
        )
        got = eager_per_channel(x, scale, zp, 0, -128, 127)
        cap = torch.backends.cpu.get_cpu_capability()
        assert_bitwise_equal(got, expected, f"float zp {zp_v}, torch CPU capability {cap}")
        # the same through the per-group entry point
        got_g = eager_per_group(x, scale.reshape(1, 1), zp.reshape(1, 1), x.shape[1], -128, 127)
        assert_bitwise_equal(got_g, expected, f"per group, float zp {zp_v}")
    # the straight-through mask follows the same rounding (qmin/qmax right at the values)
    zp = torch.tensor([-2.0])
    _, t_mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(x, scale, zp, 0, -2, 0)
    mask = fake_quantize_mask_ref(x, normalize(x, tq.QParams(scale, zp, -2, 0, axis=0)))
    assert_bitwise_equal(mask, t_mask, "float zp mask")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (0, 255)])
def test_per_channel_float_zp_zero_gives_positive_zero(dtype, qmin, qmax):
    """Float zero point 0.0 and zp + x * inv in [-0.5, 0): torch rounds with lrintf to the
    integer 0 and dequantizes (0 - 0.0) * scale = +0.0 (no signed zero survives an integer)."""
    x = torch.tensor([[-0.3, -0.5, -0.25, -0.0, 0.0, 0.3, 0.5, -1e-30]], dtype=dtype)
    scale = torch.tensor([1.0, 0.5])
    x = x.expand(2, -1).contiguous()
    for zp in (torch.tensor([0.0, 0.0]), torch.tensor([-0.0, 0.0])):
        expected = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, qmin, qmax)
        got = eager_per_channel(x, scale, zp, 0, qmin, qmax)
        assert_bitwise_equal(got, expected, f"float zp {zp.tolist()} signed zero")
        got_g = eager_per_group(x, scale.reshape(2, 1), zp.reshape(2, 1), x.shape[1], qmin, qmax)
        assert_bitwise_equal(got_g, expected, f"per group float zp {zp.tolist()} signed zero")


def _special_channel_input(dtype, channels=4, cols=None):
    row = torch.tensor(SPECIALS + [0.37, -0.37, 5.0, -5.0], dtype=torch.float32)
    cols = cols or row.numel()
    return row[:cols].unsqueeze(0).expand(channels, -1).contiguous().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("float_zp", [False, True], ids=["int_zp", "float_zp"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_special_values_parity(dtype, float_zp, axis):
    """NaN, -inf, huge negatives, subnormals, -0.0: equal to torch. Positive overflow (+inf,
    x / scale >= 2**63): the documented saturation to quant_max."""
    x = _special_channel_input(dtype, channels=4)
    if axis != 0:
        x = x.t().contiguous()
    c = x.shape[axis]
    qmin, qmax = -128, 127
    gen = _gen(c)
    scale = torch.exp(torch.empty(c).uniform_(math.log(1e-3), math.log(10.0), generator=gen))
    if float_zp:
        zp = torch.empty(c).uniform_(-128.0, 127.0, generator=gen)
    else:
        zp = torch.randint(qmin, qmax + 1, (c,), generator=gen, dtype=torch.int32)
    got = eager_per_channel(x, scale, zp, axis, qmin, qmax)
    expected = torch_per_channel_expected(x, scale, zp, axis, qmin, qmax)
    assert_bitwise_equal(got, expected, "per channel specials")
    # outside the positive overflow, exactly torch's own per-channel output
    over = _positive_overflow(x, scale, zp, axis % x.dim())
    assert bool(over.any())
    raw = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)
    assert_bitwise_equal(got[~over], raw[~over], "per channel specials, non-overflow")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("qmin", "qmax"), [(-128, 127), (0, 255), (-8, 7), *RANGES_16])
def test_per_channel_positive_overflow_saturates_like_per_tensor(dtype, qmin, qmax):
    """The documented deviation: +inf and huge positive values saturate to quant_max per
    channel, i.e. each channel equals torch's per-tensor op with that channel's qparams."""
    x = _special_channel_input(dtype, channels=5)
    zps = _zero_points(qmin, qmax)
    zp = torch.tensor([zps[i % len(zps)] for i in range(5)], dtype=torch.int32)
    scale = torch.tensor([0.1, 1e-3, 1.0, 0.0371, 1e-30], dtype=torch.float32)
    got = eager_per_channel(x, scale, zp, 0, qmin, qmax)
    for c in range(5):
        want = torch.fake_quantize_per_tensor_affine(x[c], scale[c].item(), int(zp[c]), qmin, qmax)
        assert_bitwise_equal(got[c], want, f"channel {c} vs per tensor")
    plus_inf = x[0].float() == math.inf  # in fp16, 1e30 and 3e38 are +inf too
    sat = ((qmax - zp.float()) * scale).to(dtype)
    cols = got[:, plus_inf]
    assert_bitwise_equal(cols, sat.unsqueeze(1).expand_as(cols), "+inf -> qmax")


def test_per_channel_positive_overflow_float_zp():
    x = _special_channel_input(torch.float32, channels=3)
    scale = torch.tensor([0.1, 1e-30, 2.0], dtype=torch.float32)
    zp = torch.tensor([0.5, -3.25, 100.75], dtype=torch.float32)
    got = eager_per_channel(x, scale, zp, 0, -128, 127)
    over = _positive_overflow(x, scale, zp, 0)
    sat = _saturated_value(x, scale, zp, 0, 127)
    assert_bitwise_equal(got[over], sat[over], "float zp +overflow -> qmax")
    assert_bitwise_equal(got, torch_per_channel_expected(x, scale, zp, 0, -128, 127))


@pytest.mark.parametrize("float_zp", [False, True], ids=["int_zp", "float_zp"])
def test_per_channel_extreme_and_zero_scales(float_zp):
    scales = [0.0, 1e-45, 1e-40, 1e-38, 1e-30, 1e-4, 1e4, 1e30, 3e38, 3.4028235e38]
    scale = torch.tensor(scales, dtype=torch.float32)
    c = scale.numel()
    gen = _gen(99)
    cols = torch.cat([torch.randn(12, generator=gen) * 100, torch.tensor(SPECIALS)])
    x = cols.unsqueeze(0).expand(c, -1).contiguous()
    if float_zp:
        zp = torch.linspace(-128.0, 127.0, c) + 0.3
        zp = zp.clamp(-128.0, 127.0)
    else:
        zp = torch.linspace(-128, 127, c).round().to(torch.int32)
    for dtype in DTYPES:
        xd = x.to(dtype)
        got = eager_per_channel(xd, scale, zp, 0, -128, 127)
        expected = torch_per_channel_expected(xd, scale, zp, 0, -128, 127)
        assert_bitwise_equal(got, expected, f"extreme scales {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("float_zp", [False, True], ids=["int_zp", "float_zp"])
def test_per_channel_non_contiguous(dtype, float_zp):
    gen = _gen(17)
    base = (torch.randn(17, 33, generator=gen) * 3).to(dtype)
    base4 = (torch.randn(2, 3, 5, 7, generator=gen) * 3).to(dtype)
    views = [
        ("transposed", base.t(), 0),
        ("transposed", base.t(), 1),
        ("step", base[::2, 1::3], 0),
        ("step", base[::2, 1::3], 1),
        ("expanded", base[:, :1].expand(17, 9), 1),
        ("permuted", base4.permute(3, 1, 0, 2), 1),
        ("permuted", base4.permute(3, 1, 0, 2), -1),
        ("sliced4d", base4[:, ::2, 1:, ::3], 2),
    ]
    for name, x, axis in views:
        assert not x.is_contiguous(), name
        scale, zp = _channel_params(x.shape[axis], -128, 127, gen, float_zp=float_zp)
        expected = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), -128, 127)
        got = eager_per_channel(x, scale, zp, axis, -128, 127)
        assert_bitwise_equal(got, expected, f"per channel {name} axis={axis}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_channel_empty(dtype):
    x = torch.empty((0, 5), dtype=dtype)
    scale, zp = torch.full((5,), 0.1), torch.zeros(5, dtype=torch.int32)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zp, 1, -128, 127)
    assert_bitwise_equal(eager_per_channel(x, scale, zp, 1, -128, 127), expected, "(0,5) axis 1")
    assert_bitwise_equal(eager_per_channel(x, scale, zp, -1, -128, 127), expected, "axis -1")
    # zero channels (torch's own op cannot take this: its zero-point check reduces an empty
    # tensor); the result is an empty tensor of the same shape and dtype
    got = eager_per_channel(x, torch.empty(0), torch.empty(0, dtype=torch.int32), 0, -128, 127)
    assert got.shape == (0, 5) and got.dtype == dtype
    x1 = torch.empty((0,), dtype=dtype)
    got = eager_per_channel(x1, torch.empty(0), torch.empty(0, dtype=torch.int32), 0, -128, 127)
    assert got.shape == (0,) and got.dtype == dtype


# --------------------------------------------------------------------------------------------
# per group

GROUP_CASES = [
    ((7,), 7),
    ((7,), 1),
    ((3, 5), 5),
    ((3, 5), 1),
    ((17, 33), 11),
    ((17, 33), 3),
    ((17, 33), 33),
    ((2, 3, 5, 7), 7),
    ((2, 3, 5, 7), 1),
]
GROUP_IDS = [f"{s}-g{g}" for s, g in GROUP_CASES]


def _group_params(shape, g, qmin, qmax, gen, float_zp=False):
    pshape = (*shape[:-1], shape[-1] // g)
    n = math.prod(pshape)
    scale, zp = _channel_params(n, qmin, qmax, gen, float_zp=float_zp)
    return scale.reshape(pshape), zp.reshape(pshape)


def _group_values(shape, g, scale, qmin, qmax, gen, dtype):
    n = math.prod(shape)
    k = torch.randint(qmin - qmax - 4, qmax - qmin + 5, (n,), generator=gen).to(torch.float32)
    frac = torch.rand(n, generator=gen)
    pick = torch.randint(0, 3, (n,), generator=gen)
    frac = torch.where(pick == 0, 0.0, torch.where(pick == 1, 0.5, frac))
    x = (k + frac).reshape(-1, g) * scale.reshape(-1, 1)
    return x.reshape(shape).to(dtype)


@pytest.mark.parametrize("float_zp", [False, True], ids=["int_zp", "float_zp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("shape", "g"), GROUP_CASES, ids=GROUP_IDS)
def test_per_group_vs_reshaped_per_channel(shape, g, dtype, float_zp):
    gen = _gen(sum(shape) + g)
    qmin, qmax = -8, 7
    scale, zp = _group_params(shape, g, qmin, qmax, gen, float_zp)
    x = _group_values(shape, g, scale, qmin, qmax, gen, dtype)
    expected = torch_per_group(x, scale, zp, g, qmin, qmax)
    got = eager_per_group(x, scale, zp, g, qmin, qmax)
    assert_bitwise_equal(got, expected, f"per group {shape} g={g}")


@pytest.mark.float_zp_vs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("qmin", "qmax"), RANGES + RANGES_16, ids=[*RANGE_IDS, "u16", "s16"])
def test_per_group_all_ranges(qmin, qmax, dtype):
    gen = _gen(qmax * 3 + qmin)
    for float_zp in (False, True):
        shape, g = (4, 24), 8
        scale, zp = _group_params(shape, g, qmin, qmax, gen, float_zp)
        x = _group_values(shape, g, scale, qmin, qmax, gen, dtype)
        expected = torch_per_group(x, scale, zp, g, qmin, qmax)
        got = eager_per_group(x, scale, zp, g, qmin, qmax)
        assert_bitwise_equal(got, expected, f"per group float_zp={float_zp}")


@pytest.mark.float_zp_vs_torch
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_group_specials_and_non_contiguous(dtype):
    gen = _gen(31)
    # specials (without positive overflow) against torch
    row = torch.tensor([v for v in SPECIALS if not (v > 1e20)] + [0.5, -0.5, 1.5], dtype=dtype)
    x = row.unsqueeze(0).expand(3, -1).contiguous()
    g = row.numel()
    scale, zp = _group_params(tuple(x.shape), g, -128, 127, gen)
    assert_bitwise_equal(
        eager_per_group(x, scale, zp, g, -128, 127),
        torch_per_group(x, scale, zp, g, -128, 127),
        "per group specials",
    )
    # positive overflow saturates to quant_max, as per channel
    xp = torch.tensor([[math.inf, 1e30, 3e38, 1.0]], dtype=dtype)
    s, z = torch.tensor([[0.1]]), torch.tensor([[-3]], dtype=torch.int32)
    got = eager_per_group(xp, s, z, 4, -128, 127)
    want = torch.fake_quantize_per_tensor_affine(xp, 0.1, -3, -128, 127)
    assert_bitwise_equal(got, want, "per group +overflow")
    # non-contiguous inputs
    base = (torch.randn(12, 18, generator=gen) * 2).to(dtype)
    for name, xv, g in (
        ("transposed", base.t(), 6),
        ("step", base[::2, ::3], 3),
        ("step_rows", base[1::3], 9),
    ):
        assert not xv.is_contiguous(), name
        scale, zp = _group_params(tuple(xv.shape), g, -128, 127, gen, float_zp=name == "step")
        assert_bitwise_equal(
            eager_per_group(xv, scale, zp, g, -128, 127),
            torch_per_group(xv.contiguous(), scale, zp, g, -128, 127),
            f"per group {name}",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_group_empty(dtype):
    x = torch.empty((0, 6), dtype=dtype)
    got = eager_per_group(x, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int32), 3, -8, 7)
    assert got.shape == (0, 6) and got.dtype == dtype


# --------------------------------------------------------------------------------------------
# gradients and the straight-through mask


def _grad_y(shape, dtype, gen, specials: bool) -> torch.Tensor:
    g = torch.randn(shape, generator=gen).to(dtype)
    if specials and g.numel() >= 3:
        flat = g.view(-1)
        flat[0], flat[1], flat[-1] = float("nan"), float("inf"), float("-inf")
    return g


def _eager_grad(fn, x, grad_y):
    xr = x.detach().clone().requires_grad_(True)
    with tq.use_backend("eager"):
        y = fn(xr)
        y.backward(grad_y)
    return y.detach(), xr.grad


def _torch_grad(fn, x, grad_y):
    xr = x.detach().clone().requires_grad_(True)
    y = fn(xr)
    y.backward(grad_y)
    return y.detach(), xr.grad


@pytest.mark.parametrize("specials", [False, True], ids=["finite_dy", "nan_inf_dy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grad_per_tensor(shape, dtype, specials):
    gen = _gen(sum(shape) + specials)
    qmin, qmax, scale, zp = -128, 127, 0.05, 5
    x = _values(shape, qmin, qmax, scale, zp, gen, dtype)
    if specials:
        flat = x.view(-1)
        flat[-2:] = torch.tensor([float("nan"), float("inf")], dtype=dtype)
    dy = _grad_y(shape, dtype, gen, specials)
    y, gx = _eager_grad(lambda t: tq.fake_quantize_per_tensor(t, scale, zp, qmin, qmax), x, dy)
    ty, tgx = _torch_grad(
        lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp, qmin, qmax), x, dy
    )
    assert_bitwise_equal(y, ty, "forward")
    assert_bitwise_equal(gx, tgx, "x.grad")
    # the straight-through mask
    nq = normalize(x, tq.QParams(scale, zp, qmin, qmax))
    mask = fake_quantize_mask_ref(x, nq)
    _, t_mask = torch.ops.aten.fake_quantize_per_tensor_affine_cachemask(x, scale, zp, qmin, qmax)
    assert_bitwise_equal(mask, t_mask, "mask")


@pytest.mark.parametrize("specials", [False, True], ids=["finite_dy", "nan_inf_dy"])
@pytest.mark.parametrize("float_zp", [False, True], ids=["int_zp", "float_zp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("shape", "axis"), CHANNEL_CASES[::2], ids=CHANNEL_IDS[::2])
def test_grad_per_channel(shape, axis, dtype, float_zp, specials):
    gen = _gen(sum(shape) + axis + 7 * specials)
    qmin, qmax = -128, 127
    scale, zp = _channel_params(shape[axis], qmin, qmax, gen, float_zp=float_zp)
    x = _channel_values(shape, axis, scale, zp, qmin, qmax, gen, dtype)
    if specials:
        flat = x.view(-1)
        flat[-3:] = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=dtype)
    dy = _grad_y(shape, dtype, gen, specials)
    ax = axis % len(shape)
    y, gx = _eager_grad(
        lambda t: tq.fake_quantize_per_channel(t, scale, zp, axis, qmin, qmax), x, dy
    )
    ty, tgx = _torch_grad(
        lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp, ax, qmin, qmax), x, dy
    )
    assert_bitwise_equal(y, torch_per_channel_expected(x, scale, zp, axis, qmin, qmax), "fwd")
    over = _positive_overflow(x, scale, zp, ax)
    assert_bitwise_equal(y[~over], ty[~over], "forward outside +overflow")
    # the gradient is bit-exact everywhere, +inf included (its mask is 0 either way)
    assert_bitwise_equal(gx, tgx, "x.grad")
    nq = normalize(x, tq.QParams(scale, zp, qmin, qmax, axis=axis))
    mask = fake_quantize_mask_ref(x, nq)
    _, t_mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
        x, scale, zp, ax, qmin, qmax
    )
    assert_bitwise_equal(mask, t_mask, "mask")


@pytest.mark.parametrize("specials", [False, True], ids=["finite_dy", "nan_inf_dy"])
@pytest.mark.parametrize("float_zp", [False, True], ids=["int_zp", "float_zp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("shape", "g"), GROUP_CASES[::2], ids=GROUP_IDS[::2])
def test_grad_per_group(shape, g, dtype, float_zp, specials):
    gen = _gen(sum(shape) + g + 3 * specials)
    qmin, qmax = -8, 7
    scale, zp = _group_params(shape, g, qmin, qmax, gen, float_zp)
    x = _group_values(shape, g, scale, qmin, qmax, gen, dtype)
    if specials:
        flat = x.view(-1)
        flat[-2:] = torch.tensor([float("nan"), float("-inf")], dtype=dtype)
    dy = _grad_y(shape, dtype, gen, specials)
    y, gx = _eager_grad(lambda t: tq.fake_quantize_per_group(t, scale, zp, g, qmin, qmax), x, dy)
    ty, tgx = _torch_grad(lambda t: torch_per_group(t, scale, zp, g, qmin, qmax), x, dy)
    assert_bitwise_equal(y, ty, "forward")
    assert_bitwise_equal(gx, tgx, "x.grad")
    nq = normalize(x, tq.QParams(scale, zp, qmin, qmax, group_size=g))
    mask = fake_quantize_mask_ref(x, nq)
    _, t_mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
        x.reshape(-1, g), scale.reshape(-1), zp.reshape(-1), 0, qmin, qmax
    )
    assert_bitwise_equal(mask, t_mask.reshape(shape), "mask")


def test_grad_non_contiguous_and_zero_dim():
    gen = _gen(41)
    base = torch.randn(9, 12, generator=gen) * 4
    x = base.t()[::2]
    dy = torch.randn(x.shape, generator=gen)
    _, gx = _eager_grad(lambda t: tq.fake_quantize_per_tensor(t, 0.03, 0, -128, 127), x, dy)
    _, tgx = _torch_grad(
        lambda t: torch.fake_quantize_per_tensor_affine(t, 0.03, 0, -128, 127), x, dy
    )
    assert_bitwise_equal(gx, tgx, "non-contiguous grad")
    x0 = torch.tensor(1.234)
    dy0 = torch.tensor(-0.75)
    for v in (1.234, 100.0, -100.0):
        x0 = torch.tensor(v)
        _, gx = _eager_grad(lambda t: tq.fake_quantize_per_tensor(t, 0.1, 0, -128, 127), x0, dy0)
        _, tgx = _torch_grad(
            lambda t: torch.fake_quantize_per_tensor_affine(t, 0.1, 0, -128, 127), x0, dy0
        )
        assert_bitwise_equal(gx, tgx, f"0-dim grad {v}")


# --------------------------------------------------------------------------------------------
# property test

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None


if given is not None:

    @st.composite
    def _cases(draw):
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
        bits = draw(st.integers(2, 8))
        signed = draw(st.booleans())
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        dtype = draw(st.sampled_from(DTYPES))
        gran = draw(st.sampled_from(["tensor", "channel", "group"]))
        axis = draw(st.integers(-ndim, ndim - 1))
        divisors = [d for d in range(1, shape[-1] + 1) if shape[-1] % d == 0]
        g = draw(st.sampled_from(divisors))
        float_zp = gran != "tensor" and draw(st.booleans())
        log_scale = draw(st.floats(-4.0, 2.0))
        seed = draw(st.integers(0, 2**31 - 1))
        return shape, qmin, qmax, dtype, gran, axis, g, float_zp, log_scale, seed

    @pytest.mark.float_zp_vs_torch
    @given(_cases())
    def test_property_reference_equals_torch(case):
        shape, qmin, qmax, dtype, gran, axis, g, float_zp, log_scale, seed = case
        gen = _gen(seed)
        if gran == "tensor":
            scale = float(10.0**log_scale)
            zp = int(torch.randint(qmin, qmax + 1, (1,), generator=gen))
            x = _values(shape, qmin, qmax, scale, zp, gen, dtype)
            x = x + (torch.randn(shape, generator=gen) * scale).to(dtype)
            expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
            got = eager_per_tensor(x, scale, zp, qmin, qmax)
        elif gran == "channel":
            c = shape[axis]
            lo = 10.0**log_scale
            scale, zp = _channel_params(c, qmin, qmax, gen, float_zp, lo, min(lo * 100, 100.0))
            x = _channel_values(shape, axis, scale, zp, qmin, qmax, gen, dtype)
            expected = torch.fake_quantize_per_channel_affine(
                x, scale, zp, axis % len(shape), qmin, qmax
            )
            got = eager_per_channel(x, scale, zp, axis, qmin, qmax)
        else:
            pshape = (*shape[:-1], shape[-1] // g)
            lo = 10.0**log_scale
            scale, zp = _channel_params(
                math.prod(pshape), qmin, qmax, gen, float_zp, lo, min(lo * 100, 100.0)
            )
            scale, zp = scale.reshape(pshape), zp.reshape(pshape)
            x = _group_values(shape, g, scale, qmin, qmax, gen, dtype)
            expected = torch_per_group(x, scale, zp, g, qmin, qmax)
            got = eager_per_group(x, scale, zp, g, qmin, qmax)
        assert_bitwise_equal(got, expected, f"property case {case}")


# --------------------------------------------------------------------------------------------
# the reference on another device equals the reference on the CPU


def test_reference_on_device_equals_cpu(device):
    if device.type == "cpu":
        pytest.skip("device is cpu: nothing to compare against")
    gen = _gen(2024)
    for dtype in DTYPES:
        x = (
            torch.cat(
                [torch.randn(17 * 33 - len(SPECIALS), generator=gen) * 10, torch.tensor(SPECIALS)]
            )
            .reshape(17, 33)
            .to(dtype)
        )
        ties = _ties_x(dtype, 0.125)
        xd, tiesd = x.to(device), ties.to(device)
        # per tensor
        for scale, zp in ((0.1, 0), (0.125, 3), (0.0, 0), (1e-40, -5)):
            assert_bitwise_equal(
                eager_per_tensor(xd, scale, zp, -128, 127),
                eager_per_tensor(x, scale, zp, -128, 127),
                f"per tensor on {device} scale={scale}",
            )
            assert_bitwise_equal(
                eager_per_tensor(tiesd, scale, zp, -128, 127),
                eager_per_tensor(ties, scale, zp, -128, 127),
                f"ties on {device} scale={scale}",
            )
        # per channel (int and float zp; triton_qat uses the CPU formula on every device)
        for float_zp in (False, True):
            for axis in (0, 1, -1):
                scale, zp = _channel_params(x.shape[axis], -128, 127, gen, float_zp=float_zp)
                assert_bitwise_equal(
                    eager_per_channel(xd, scale.to(device), zp.to(device), axis, -128, 127),
                    eager_per_channel(x, scale, zp, axis, -128, 127),
                    f"per channel on {device} axis={axis} float_zp={float_zp}",
                )
            scale, zp = _group_params((17, 33), 11, -8, 7, gen, float_zp)
            assert_bitwise_equal(
                eager_per_group(xd, scale.to(device), zp.to(device), 11, -8, 7),
                eager_per_group(x, scale, zp, 11, -8, 7),
                f"per group on {device} float_zp={float_zp}",
            )
        # gradients with NaN / inf in dy
        dy = _grad_y(x.shape, dtype, gen, True)
        scale, zp = _channel_params(17, -128, 127, gen)
        _, gx_cpu = _eager_grad(
            lambda t, s=scale, z=zp: tq.fake_quantize_per_channel(t, s, z, 0, -128, 127), x, dy
        )
        sd, zd = scale.to(device), zp.to(device)
        _, gx_dev = _eager_grad(
            lambda t, s=sd, z=zd: tq.fake_quantize_per_channel(t, s, z, 0, -128, 127),
            xd,
            dy.to(device),
        )
        assert_bitwise_equal(gx_dev, gx_cpu, f"grad on {device}")


def test_fma_fp32_rounds_once():
    """a * b + c with one rounding, where float64 followed by float32 would round twice:
    (1 + 2**-18) * 2**-24 * (1 - 2**-18) + (1 + 2**-23) = 1 + 2**-23 + 2**-24 - 2**-60 lies
    just below an fp32 midpoint that float64 rounds onto (then ties-to-even goes up)."""
    from triton_qat.numerics.reference import fma_fp32

    a = torch.tensor([1 + 2**-18, float("inf"), 1.0, 3.0])
    b = torch.tensor([2**-24 * (1 - 2**-18), 2.0, float("inf"), 0.5])
    c = torch.tensor([1 + 2**-23, 1.0, 1.0, 0.25])
    got = fma_fp32(a, b, c)
    twice = (a.double() * b.double() + c.double()).float()
    assert got[0].item() == 1 + 2**-23 and twice[0].item() == 1 + 2**-22
    assert got[1].item() == float("inf") and got[2].item() == float("inf")
    assert got[3].item() == 1.75
