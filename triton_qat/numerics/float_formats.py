"""FP8 fake quantization (float8_e4m3fn, float8_e5m2): the exact rules and the eager reference.

Formats (OCP 8-bit floating point, as torch's dtypes of the same name):

    e4m3fn: 3 mantissa bits, smallest normal 2**-6, subnormals down to 2**-9, largest 448,
            no infinity (S.1111.111 is NaN)
    e5m2:   2 mantissa bits, smallest normal 2**-14, subnormals down to 2**-16, largest
            57344, IEEE infinities and NaNs

Scale (fp32, one per tensor or one per row; a row is the last dim: a weight (N, K) gets one
scale per output channel, an activation (..., K) one per token):

    amax  = max(|x|) over the group, exact, taken in fp32 (NaN if the group holds a NaN)
    amax  = max(amax, eps)                  eps = 1e-12 (torchao.float8's EPS)
    scale = float32(amax) / float32(fmax)   one IEEE fp32 division

Fake quant of x with an fp32 scale (broadcast over x):

    v = float32(x) / scale                  a true fp32 division (torchao divides; it does
                                            not multiply by a reciprocal, unlike the integer
                                            path in NUMERICS.md); in Triton div_rn, not `/`
    v = clamp(v, -fmax, fmax)               saturation; NaN stays NaN
    q = round_to_float8(v)                  round to nearest, ties to even, subnormals kept
                                            (torch's v.to(float8 dtype) on the clamped v)
    y = cast(float32(q) * scale, x.dtype)   one fp32 multiply, one cast to the input dtype

round_to_float8 is written here in fp32 arithmetic (no float8 dtype needed, the form the
Triton kernels take): with e = max(floor(log2|v|), emin) the quantum is 2**(e - mbits) and
q = rne(v / quantum) * quantum, both steps exact (powers of two). It equals torch's cast for
every fp32 value in [-fmax, fmax] (tests/test_float_formats.py: all 2**16 bf16 and fp16
values, ties, subnormals); the sign of zero is kept (-0.0 -> -0.0).

Special values:
- NaN / inf in a group: its amax is NaN / inf, so its scale is NaN / inf and every element of
  the group comes out NaN (inf / inf and 0 * inf are NaN). torchao does the same.
- With a given finite scale (fake_quantize_float8_ref): NaN -> NaN, +-inf -> +-fmax * scale.
- A zero group (amax 0, or any amax below eps): scale = eps / fmax, every element rounds
  to +-0 (or a tiny subnormal code times the tiny scale), never NaN.
- amax within an ulp of the fp32 maximum: fmax * scale may round to inf, as in torchao.

Straight-through estimator (triton_qat.ops.fake_quantize_float8): dx = dy for every element,
and the scale is a constant for autograd. With a scale from the group's own amax nothing
saturates (|x| / scale <= fmax up to the rounding of the scale itself), so a saturation mask
could only ever drop the group's largest element on a one-ulp artefact.

Where torchao 0.18 (torchao.quantization.qat.Float8FakeQuantizer, Float8FakeQuantizeConfig
with PerRow() / PerTensor()) differs, triton_qat follows the rules above:
1. amax 0: torchao divides by a zero scale (0 / 0) and returns NaN for a zero row or tensor
   unless hp_value_lb is set; here amax is clamped to eps = 1e-12, as torchao's own float8
   training path (torchao.float8.float8_utils.amax_to_scale) does. With hp_value_lb=1e-12
   torchao and this reference agree bit for bit on fp32 inputs, zero rows included.
2. bf16 / fp16 inputs: torchao computes amax / fmax in the input dtype, so its scale is
   rounded to bf16 / fp16 (and an fp16 scale underflows to a subnormal or 0, NaN again, for
   amax below about 2.7e-5); here the scale is fp32. Given torchao's scale, the rest of the
   computation (division, clamp, cast, multiply, cast) agrees bit for bit in every dtype.
3. Gradients: torchao differentiates through its scale (amax is not detached) and its
   backward casts the incoming gradient to the float8 dtype (the autograd of q.to(float32)),
   so its dx is not dy; here dx = dy exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT8_EPS = 1e-12
GRANULARITIES = ("per_tensor", "per_row", "per_token")
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Float8Format:
    """One float8 format: torch's dtype name, mantissa bits, smallest normal exponent, max."""

    name: str
    mbits: int
    emin: int
    fmax: float

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.name)


FORMATS = {
    "float8_e4m3fn": Float8Format("float8_e4m3fn", 3, -6, 448.0),
    "float8_e5m2": Float8Format("float8_e5m2", 2, -14, 57344.0),
}


def float8_format(dtype: object, name: str = "dtype") -> Float8Format:
    """The Float8Format of `dtype`: torch.float8_e4m3fn / torch.float8_e5m2 or their names
    ("float8_e4m3fn", "e4m3fn", "float8_e5m2", "e5m2"). Errors name the argument `name`."""
    if isinstance(dtype, torch.dtype):
        key = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        key = dtype if dtype.startswith("float8_") else "float8_" + dtype
    else:
        raise TypeError(
            f"{name} must be a torch float8 dtype or its name, got {type(dtype).__name__}"
        )
    fmt = FORMATS.get(key)
    if fmt is None:
        raise ValueError(
            f"{name} must be one of {sorted(FORMATS)} (float8_e4m3fn or float8_e5m2), got {dtype!r}"
        )
    if not isinstance(getattr(torch, key, None), torch.dtype):
        raise ValueError(f"{name}: the installed torch {torch.__version__} has no torch.{key}")
    return fmt


def check_granularity(granularity: object, name: str = "granularity") -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"{name} must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity  # type: ignore[return-value]


def choose_scale_float8_ref(
    x: Tensor, fmt: Float8Format, granularity: str, eps: float = FLOAT8_EPS
) -> Tensor:
    """fp32 scale of x: one (shape [1] * x.dim()) per tensor, or one per row (shape
    (*x.shape[:-1], 1)) for "per_row" / "per_token" (amax over the last dim)."""
    a = x.detach().float().abs()
    if granularity == "per_tensor":
        amax = a.amax().reshape([1] * x.dim())
    else:
        amax = a.amax(dim=-1, keepdim=True)
    amax = torch.clamp(amax, min=eps)  # NaN stays NaN
    return amax / torch.tensor(fmt.fmax, dtype=torch.float32)


def round_to_float8_ref(v: Tensor, fmt: Float8Format) -> Tensor:
    """fp32 v saturated to [-fmax, fmax] and rounded to the nearest float8 value, ties to
    even (NaN stays NaN), in fp32 arithmetic: equals v.clamp(-fmax, fmax).to(fmt.dtype)."""
    v = torch.clamp(v.float(), -fmt.fmax, fmt.fmax)
    _, exponent = torch.frexp(v)  # |v| = m * 2**exponent, m in [0.5, 1)
    e = torch.clamp(exponent - 1, min=fmt.emin) - fmt.mbits  # quantum 2**e
    return torch.round(v * _pow2(-e)) * _pow2(e)


def _pow2(e: Tensor) -> Tensor:
    """2.0**e in fp32, exact, for integer e in [-126, 127] (built from the exponent bits)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def fake_quantize_float8_ref(x: Tensor, scale: Tensor, fmt: Float8Format) -> Tensor:
    """Fake quant of x with the given fp32 scale (broadcast over x), output in x.dtype."""
    scale = scale.float()
    q = round_to_float8_ref(x.float() / scale, fmt)
    return (q * scale).to(x.dtype)


def fake_quantize_float8_dynamic_ref(
    x: Tensor, fmt: Float8Format, granularity: str, eps: float = FLOAT8_EPS
) -> Tensor:
    """Fake quant of x with its scale from its own amax (per tensor, per row / token)."""
    if x.numel() == 0:
        return x.clone()
    return fake_quantize_float8_ref(x, choose_scale_float8_ref(x, fmt, granularity, eps), fmt)
