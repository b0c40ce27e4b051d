"""The kernels' round-half-even helper, fp32 -> half casts, negation and fma, bit for bit."""

from fractions import Fraction

import pytest
import torch
import triton
import triton.language as tl
from _compare import assert_bitwise_equal

from triton_qat.kernels.rounding import (
    cast_rne,
    fma_rn,
    fma_rn_emulated,
    negate,
    round_half_even,
    round_half_even_f64,
    round_half_even_then_clamped,
    to_fp32,
)


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, round_half_even(tl.load(x_ptr + offs, mask=m)), mask=m)


@triton.jit
def _round_f64_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, round_half_even_f64(tl.load(x_ptr + offs, mask=m)), mask=m)


@triton.jit
def _round_clamped_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, round_half_even_then_clamped(tl.load(x_ptr + offs, mask=m)), mask=m)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    y = cast_rne(tl.load(x_ptr + offs, mask=m), y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, y, mask=m)


@triton.jit
def _widen_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, to_fp32(tl.load(x_ptr + offs, mask=m)), mask=m)


def _run(kernel, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    block = 1024
    kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    return y


def _interesting_fp32(device) -> torch.Tensor:
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 1e6 + 0.5, 4194303.5, 8388607.5])
    ties = torch.cat([ties, -ties])
    inf = torch.full_like(ties, float("inf"))
    neighbours = torch.cat([torch.nextafter(ties, inf), torch.nextafter(ties, -inf)])
    special = torch.tensor(
        [
            0.0,
            -0.0,
            0.49999997,
            -0.49999997,
            1e-45,
            -1e-45,
            1.1754942e-38,
            0.3,
            -0.3,
            0.7,
            -0.7,
            8388608.0,
            8388609.0,
            16777217.0,
            1e30,
            -1e30,
            3.4028235e38,
            -3.4028235e38,
            float("inf"),
            float("-inf"),
            float("nan"),
        ]
    )
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=torch.Generator().manual_seed(0))
    random_bits = bits.to(torch.int32).view(torch.float32)
    moderate = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 300
    halves = torch.arange(-2000, 2000, dtype=torch.float32) / 2  # every .5 tie near zero
    return torch.cat([ties, neighbours, special, random_bits, moderate, halves]).to(device)


def test_round_half_even_matches_torch_round(device):
    x = _interesting_fp32(device)
    assert_bitwise_equal(_run(_round_kernel, x, torch.float32), torch.round(x), "round_half_even")


def test_round_half_even_f64_matches_torch_round(device):
    """The fp64 twin (the fused observer's zero point): fp32 cases widened, fp64 ties up to
    2**52, their neighbours, and random bit patterns."""
    ties = torch.tensor([0.5, 2.5, 127.5, 2.0**51 + 0.5, 2.0**52 - 0.5], dtype=torch.float64)
    ties = torch.cat([ties, -ties])
    inf = torch.full_like(ties, float("inf"))
    neighbours = torch.cat([torch.nextafter(ties, inf), torch.nextafter(ties, -inf)])
    big = torch.tensor([2.0**52, 2.0**52 + 1, 2.0**53 + 2, 1e300, -1e300], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    bits = torch.randint(-(2**63), 2**63 - 1, (4096,), generator=g, dtype=torch.int64)
    x = torch.cat(
        [_interesting_fp32("cpu").double(), ties, neighbours, big, bits.view(torch.float64)]
    )
    x = x.to(device)
    assert_bitwise_equal(_run(_round_f64_kernel, x, torch.float64), torch.round(x), "f64")


def test_floor_plus_half_would_fail_here():
    # Guards the test data: the naive rounding is wrong on these, so the test above can fail.
    x = torch.tensor([0.49999997, 2.5, -1.5])
    assert not torch.equal(torch.floor(x + 0.5), torch.round(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cast_rne_matches_torch(device, dtype):
    x = _interesting_fp32(device)
    assert_bitwise_equal(_run(_cast_kernel, x, dtype), x.to(dtype), f"cast to {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_to_fp32_is_exact(device, dtype):
    x = _interesting_fp32(device).to(dtype)  # includes subnormals of every dtype
    assert_bitwise_equal(_run(_widen_kernel, x, torch.float32), x.float(), f"{dtype} -> fp32")


def test_two_op_rounding_exact_below_2_pow_22_and_saturates_beyond(device):
    x = _interesting_fp32(device)
    got = _run(_round_clamped_kernel, x, torch.float32)
    expected = torch.round(x)
    small = x.abs() < 2**22
    # Below 2**22: rne exactly, except that -0.0 may become +0.0.
    assert_bitwise_equal(got[small] + 0.0, expected[small] + 0.0, "|v| < 2**22")
    # Beyond: v's sign, magnitude above 2**21: every clamp bound within +-2**21 sees v's side.
    big = ~small & torch.isfinite(x)
    assert big.sum() > 100
    assert torch.equal(torch.sign(got[big]), torch.sign(x[big]))
    assert bool((got[big].abs() > 2.0**21).all())
    special = ~torch.isfinite(x)
    assert_bitwise_equal(got[special], x[special], "inf and NaN pass through")


@triton.jit
def _negate_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, negate(tl.load(x_ptr + offs, mask=m)), mask=m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negate_flips_the_sign_of_zero_too(device, dtype):
    x = _interesting_fp32(device).to(dtype)
    assert_bitwise_equal(_run(_negate_kernel, x, dtype), torch.neg(x), f"negate {dtype}")
    assert _run(_negate_kernel, torch.zeros(1, dtype=dtype, device=device), dtype).signbit()


@triton.jit
def _fma_kernel(a_ptr, b_ptr, c_ptr, y_ptr, n, EMULATED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(a_ptr + offs, mask=m)
    b = tl.load(b_ptr + offs, mask=m)
    c = tl.load(c_ptr + offs, mask=m)
    y = fma_rn_emulated(a, b, c) if EMULATED else fma_rn(a, b, c)
    tl.store(y_ptr + offs, y, mask=m)


def _fma_exact(a: float, b: float, c: float) -> float:
    """a * b + c rounded once to fp32 (nearest, ties to even), from exact rationals."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    if exact == 0:  # the sign of a zero sum: IEEE's rules, which fp64 follows exactly
        return float(torch.tensor(a, dtype=torch.float64) * b + c)
    near = torch.tensor(float(exact), dtype=torch.float64).float()
    inf = torch.tensor(float("inf"))
    candidates = [torch.nextafter(near, -inf), near, torch.nextafter(near, inf)]
    finite = [v for v in candidates if torch.isfinite(v)]
    best = min(
        finite, key=lambda v: (abs(Fraction(v.item()) - exact), int(v.view(torch.int32)) & 1)
    )
    return best.item()


def _fma_cases() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n = 1500
    exps = torch.randint(-3, 4, (2, n), generator=g).float()
    a = torch.randn(n, generator=g) * 10.0 ** exps[0]
    b = torch.randn(n, generator=g)
    c = torch.randn(n, generator=g) * 10.0 ** exps[1]
    # Double rounding bites here: a * b = 2**-24 - i**2 * 2**-70 lies just below half an ulp
    # of c = 1 + 2**-23, so rounding a * b (or the fp64 sum) first lands on the tie, which
    # goes to even (up), while the exact sum rounds down.
    i = torch.arange(1, 65, dtype=torch.float64)
    ha = (1 + i * 2**-23).float()
    hb = ((1 - i * 2**-23) * 2**-24).float()
    hc = torch.full_like(ha, 1 + 2**-23)
    # The probe's case, zeros (signed), subnormal products, and a cancelling product.
    sa = torch.tensor([1 + 2**-12, 0.0, -0.0, 0.0, 1e-20, 3.0, 0.1])
    sb = torch.tensor([1 + 2**-12, 5.0, 5.0, -1.0, 1e-20, 1e-45, 0.1])
    sc = torch.tensor([-1.0, -0.0, -0.0, -0.0, 0.0, -0.0, -0.010000001])
    a = torch.cat([a, ha, -ha, ha, sa])
    b = torch.cat([b, hb, hb, -hb, sb])
    c = torch.cat([c, hc, -hc, -hc, sc])
    return a, b, c


@pytest.mark.parametrize("emulated", [False, True], ids=["fma_rn", "emulated"])
def test_fma_rounds_once(device, emulated):
    """fma_rn is tl.fma where that rounds once, the fp64 emulation where it does not (Triton
    3.6's interpreter); both give the correctly rounded a * b + c on every Triton."""
    a, b, c = _fma_cases()
    expected = torch.tensor(
        [_fma_exact(*abc) for abc in zip(a.tolist(), b.tolist(), c.tolist(), strict=True)],
        dtype=torch.float32,
    )
    assert not torch.equal(a * b + c, expected)  # the data tells one rounding from two
    y = torch.empty_like(a, device=device)
    a, b, c = (t.to(device) for t in (a, b, c))
    _fma_kernel[(triton.cdiv(a.numel(), 512),)](a, b, c, y, a.numel(), EMULATED=emulated, BLOCK=512)
    assert_bitwise_equal(y, expected, "fma")
