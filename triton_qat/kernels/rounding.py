"""Round half to even, exact for every fp32 value, in plain `tl` (no libdevice), exact casts,
and the two float operations Triton 3.6 gets wrong: negation (its front end) and fma (its
interpreter).

libdevice's rint is unavailable under the interpreter, and floor(v + 0.5) is wrong at ties
and at 0.49999997 (v + 0.5 rounds up to 1.0 in fp32).
"""

import torch
import triton
import triton.language as tl

from triton_qat.kernels import INTERPRETED_KERNELS

# The interpreter truncates fp32 -> bf16 casts and garbles bf16 subnormals on the way up;
# compiled kernels do both exactly. Under the interpreter the helpers below use bit casts.
INTERPRETED: tl.constexpr = tl.constexpr(INTERPRETED_KERNELS)

# fp32 values at or above this magnitude are integers already.
TWO_POW_23: tl.constexpr = tl.constexpr(8388608.0)
# 1.5 * 2**23: v + this lies in [2**23, 2**24), where fp32 steps by exactly 1, for |v| < 2**22.
ROUNDING_MAGIC: tl.constexpr = tl.constexpr(12582912.0)


SIGN_BIT_32: tl.constexpr = tl.constexpr(0x80000000)
SIGN_BIT_64: tl.constexpr = tl.constexpr(0x8000000000000000)


@triton.jit
def negate(x):
    """-x of an fp32 or fp64 tensor as IEEE negation: the sign bit flipped, so -(+0.0) is -0.0.

    Write this, not `-x`, in kernels: Triton 3.6 compiles unary minus on floats as 0 - x,
    which gives +0.0 for +0.0 (and so torch.round(-0.3) would come out +0.0).
    """
    if x.dtype == tl.float64:
        return (x.to(tl.uint64, bitcast=True) ^ SIGN_BIT_64).to(tl.float64, bitcast=True)
    else:
        tl.static_assert(x.dtype == tl.float32, "negate takes fp32 or fp64")
        return (x.to(tl.uint32, bitcast=True) ^ SIGN_BIT_32).to(tl.float32, bitcast=True)


@triton.jit
def round_half_even(v):
    """torch.round of an fp32 tensor, bit for bit (signed zeros, NaN and +-inf kept).

    For 0 <= a < 2**23, a + 2**23 lies where fp32 steps by exactly 1, so the addition itself
    rounds a half to even; subtracting 2**23 again is exact. Four ALU ops, no libdevice.
    """
    a = tl.abs(v)
    small = a < TWO_POW_23  # False for NaN and inf, which pass through unchanged
    r = (a + TWO_POW_23) - TWO_POW_23
    signed = tl.where(v < 0.0, negate(r), r)
    # Large, non-finite and zero inputs are returned as they are (keeps -0.0 and NaN).
    return tl.where(small & (a != 0.0), signed, v)


@triton.jit
def round_half_even_then_clamped(v):
    """Round half to even in two ALU ops, for a result that is clamped to within +-2**21.

    Exact for |v| < 2**22. Beyond, the result keeps v's sign and a magnitude above 2**21, so
    it lies on v's side of every bound within +-2**21 and the clamp and straight-through mask
    that follow are exact. NaN stays NaN, +-inf stay +-inf; -0.0 comes back as +0.0.
    """
    return (v + ROUNDING_MAGIC) - ROUNDING_MAGIC


@triton.jit
def _fp32_to_bf16_rne(y):
    bits = y.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16).to(tl.uint16)
    out = rounded.to(tl.bfloat16, bitcast=True)
    return tl.where(y != y, y.to(tl.bfloat16), out)  # NaN: keep it NaN


@triton.jit
def cast_rne(y, dtype: tl.constexpr):
    """fp32 -> dtype rounding to nearest even, on compiled and interpreted kernels alike."""
    if INTERPRETED and dtype == tl.bfloat16:
        return _fp32_to_bf16_rne(y)
    else:
        return y.to(dtype)


@triton.jit
def to_fp32(x):
    """Exact widening to fp32 (bf16 subnormals included), compiled or interpreted."""
    if INTERPRETED and x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def dot_operand(t):
    """A tl.dot operand as is, widened to fp32 under the interpreter for bf16 (whose dot
    multiplies the raw bf16 bit patterns); products of bf16 values are exact in fp32."""
    if INTERPRETED and t.dtype == tl.bfloat16:
        return to_fp32(t)
    else:
        return t


# fp64 values at or above this magnitude are integers already.
TWO_POW_52: tl.constexpr = tl.constexpr(4503599627370496.0)


@triton.jit
def round_half_even_f64(v):
    """torch.round of an fp64 tensor, bit for bit: round_half_even with fp64's 2**52."""
    a = tl.abs(v)
    small = a < TWO_POW_52
    r = (a + TWO_POW_52) - TWO_POW_52
    signed = tl.where(v < 0.0, negate(r), r)
    return tl.where(small & (a != 0.0), signed, v)


@triton.jit
def fma_rn_emulated(a, b, c):
    """fp32 a * b + c rounded once (to nearest even), from fp64 operations: the product is
    exact in fp64 (24 + 24 bits); the sum is rounded to odd (the fp64 sum, its last bit set
    where TwoSum's error is nonzero), and rounding that to fp32 is then correct."""
    p = a.to(tl.float64) * b.to(tl.float64)
    c64 = c.to(tl.float64)
    s = p + c64
    b_virtual = s - c64
    err = (p - b_virtual) + (c64 - (s - b_virtual))  # p + c64 == s + err exactly
    bits = s.to(tl.int64, bitcast=True)
    # Inexact with an even last bit: step to the odd neighbour on err's side (not at +-inf).
    to_odd = (err != 0.0) & ((bits & 1) == 0) & (tl.abs(s) < float("inf"))
    step = tl.where((err > 0.0) == (s > 0.0), 1, -1)
    odd = tl.where(to_odd, bits + step, bits).to(tl.float64, bitcast=True)
    return odd.to(tl.float32)


@triton.jit
def _fma_probe(x_ptr, out_ptr):
    a = tl.load(x_ptr)
    tl.store(out_ptr, tl.fma(a, a, tl.load(x_ptr + 1)))


def _interpreter_fma_rounds_once() -> bool:
    """Whether the interpreter's tl.fma rounds once: (1 + 2**-12)**2 - 1 is 2**-11 + 2**-24,
    and 2**-11 when the product is rounded to fp32 before the add."""
    x = torch.tensor([1.0 + 2.0**-12, -1.0], dtype=torch.float32)
    out = torch.zeros(1, dtype=torch.float32)
    try:
        _fma_probe[(1,)](x, out)
    except Exception:  # an interpreter that cannot run it: the emulation is exact either way
        return False
    return out.item() == 2.0**-11 + 2.0**-24


# Triton 3.6's interpreter computes tl.fma as a multiply, then an add (two roundings);
# compiled kernels always use the hardware fma.
FMA_EMULATED: tl.constexpr = tl.constexpr(
    INTERPRETED_KERNELS and not _interpreter_fma_rounds_once()
)


@triton.jit
def fma_rn(a, b, c):
    """tl.fma(a, b, c) of fp32 tensors, rounded once as on a GPU, compiled or interpreted."""
    if FMA_EMULATED:
        return fma_rn_emulated(a, b, c)
    else:
        return tl.fma(a, b, c)
