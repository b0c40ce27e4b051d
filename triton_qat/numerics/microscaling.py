"""Microscaling fake quantization (MXFP8, MXFP4, NVFP4): the exact rules and the eager reference.

Blocks are `block_size` consecutive elements along the last dim (a weight (N, K) and an
activation (..., K) both along K); the last dim must be a multiple of the block size. Every
block has one scale; NVFP4 adds one fp32 scale for the whole tensor. All arithmetic is fp32
(inputs fp32 / bf16 / fp16 are upcast exactly, the output is cast once to the input dtype), so
no float8 / float4 dtype is needed from torch; torch's casts serve the tests as oracles.

Elements (OCP formats; both round to nearest, ties to even, subnormals kept, saturating):

    e4m3 (MXFP8): round_to_float8_ref with float_formats.FORMATS["float8_e4m3fn"]: largest
                  448, exponent of the largest normal emax = 8, 3 mantissa bits
    e2m1 (MXFP4, NVFP4): values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; emax = 2,
                  1 mantissa bit, smallest normal 1, one subnormal 0.5 (round_to_e2m1_ref)

round_to_e2m1_ref: v = clamp(v, -6, 6); e = max(E(v), 0) - 1 with E(v) the unbiased exponent
field of fp32 v (floor(log2|v|) for a normal v, -127 for zero or an fp32 subnormal), then
q = rne(v * 2**-e) * 2**e, both products exact. NaN stays NaN; the sign of zero is kept.

MXFP8 / MXFP4 (OCP Microscaling Formats v1.0, section 6.3, "minimally supported" conversion):

    amax  = max |x| over the block, exact (NaN if the block holds a NaN)
    E     = the unbiased exponent field of fp32 amax (floor(log2 amax); -127 for amax 0 or an
            fp32 subnormal; 128 for inf / NaN)
    s     = max(E - emax, -127)                   the shared exponent, clamped to e8m0's range
    X     = 2**s, stored as e8m0 (biased code s + 127; 2**-127 is code 0, an fp32 subnormal)
    q     = round_element(x * 2**-s)              exact product; saturates at +-fmax (the spec's
                                                  "clamping normal numbers": amax / X may reach
                                                  2**(emax+1) > fmax, e.g. 7.9 -> 6 in MXFP4)
    y     = cast(q * X, x.dtype)                  exact in fp32, one cast
    A block holding an inf or a NaN (E = 128): X is e8m0's NaN (code 255) and every element of
    the block is NaN (as in microxcaling, the spec authors' reference code).
    A zero block: X = 2**-127, every element +-0 (sign kept). fp32 subnormal inputs are kept.

NVFP4 (NVIDIA's recipe: e2m1 elements, blocks of 16, e4m3 block scales, one fp32 tensor scale;
the fp32 operation order is torchao's nvfp4_quantize, written to match its GPU kernel):

    amax_t = max(max |x| over the tensor, eps)     eps = 1e-12 (the FP8 path's, float_formats)
    s_t    = amax_t / 2688                         fp32 division; 2688 = 448 * 6
    s_b    = e4m3((amax_b / 6) / s_t)              two fp32 divisions, then round_to_float8_ref
                                                   (saturates at 448; e4m3 subnormals kept; a
                                                   quotient below 2**-10 rounds to 0; an inf
                                                   quotient, only from an inf in x, is NaN)
    r      = (1 / s_t) / s_b if s_b > 0 else 0     the block's encode factor, two fp32 divisions
    q      = round_to_e2m1_ref(x * r)              one fp32 multiply, saturating at +-6
    y      = cast(q * (s_t * s_b), x.dtype)        decode scale s_t * s_b (one fp32 multiply),
                                                   one multiply, one cast
    With per_tensor_scale=False (block scales only): s_t = 1 exactly, the same formulas.
    The tensor scale comes from the current tensor's amax (dynamic, for weights and activations
    alike, as torchao's NVFP4FakeQuantizeConfig(use_per_tensor_scale=True) does).
    A NaN or an inf anywhere in the tensor: s_t is NaN / inf, every decode scale is NaN, and
    every element of the tensor comes out NaN (with per_tensor_scale=False: the block's).
    A zero tensor: amax_t = eps, every element +-0. A zero block (s_b = 0): +-0.

Straight-through estimator (triton_qat.ops.microscaling): dx = dy everywhere; the scales are
constants for autograd.

Where torchao 0.18 (torchao.prototype.mx_formats: to_mx / MXTensor, nvfp4_quantize /
NVFP4Tensor; torchao.prototype.qat: MXFakeQuantizeConfig, NVFP4FakeQuantizeConfig) differs,
triton_qat follows the spec / recipe above (tests/test_microscaling.py checks the agreement
and each difference):
1. MX scale rounding: MXFakeQuantizeConfig defaults to ScaleCalculationMode.RCEIL,
   X = 2**ceil(log2(amax / fmax)), which never saturates; the spec's (and MXTensor.to_mx's
   default) FLOOR rule is the one here. The two agree on a block whose amax mantissa is at
   most fmax's (1.75 for e4m3, 1.5 for e2m1); above it RCEIL's X is twice the spec's.
   to_mx(..., ScaleCalculationMode.FLOOR) followed by dequantize agrees bit for bit except:
2. MX blocks holding an inf: torchao reads the exponent of inf as 128 (X = 2**(128 - emax)):
   inf becomes +-fmax * X and the finite elements are scaled by X; here the block is NaN.
3. MX tiny blocks (s = -127, amax < 2**(emax - 126)): torchao divides by 2**-126 (it clamps
   the fp32 scale to the smallest normal) but stores and multiplies back 2**-127, halving the
   block; here both are 2**-127.
4. NVFP4 small block scales: torchao clamps (amax_b / 6) / s_t to at least 2**-6 (e4m3's
   smallest normal) before the cast; the recipe's e4m3 conversion keeps subnormals (and 0),
   as here. They differ only on blocks with amax_b < amax_t * 2**-6 / 448 (about 1 / 28672).
5. NVFP4 with per_tensor_scale=False, a block holding an inf: torchao saturates its block
   scale to 448 (inf becomes 6 * 448); here the block is NaN, as with the tensor scale.
6. NVFP4 zero tensor: torchao divides by a zero tensor scale (NaN everywhere); here amax_t is
   clamped to eps (zeros), as the FP8 path does.
7. fp16 inputs: torchao's MX and NVFP4 code take fp32 and bf16 only; here fp16 too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from triton_qat.numerics.float_formats import (
    FLOAT8_EPS,
    FORMATS,
    _pow2,
    round_to_float8_ref,
)

E4M3 = FORMATS["float8_e4m3fn"]
E2M1_MAX = 6.0
NVFP4_TENSOR_DIVISOR = 448.0 * 6.0  # e4m3 max * e2m1 max: s_b reaches 448 on the amax block
E8M0_MIN_EXPONENT = -127


@dataclass(frozen=True)
class MicroscalingFormat:
    """One microscaling format: its element, default block size and scale encoding."""

    name: str  # "mxfp8" | "mxfp4" | "nvfp4"
    element: str  # "e4m3" | "e2m1"
    block_size: int  # the default (OCP MX: 32; NVFP4: 16)
    emax: int  # exponent of the element's largest normal
    fmax: float  # the element's largest value
    scale: str  # "e8m0" (a power of two) | "e4m3" (with an fp32 tensor scale)


MX_FORMATS = {
    "mxfp8": MicroscalingFormat("mxfp8", "e4m3", 32, 8, 448.0, "e8m0"),
    "mxfp4": MicroscalingFormat("mxfp4", "e2m1", 32, 2, E2M1_MAX, "e8m0"),
}
NVFP4 = MicroscalingFormat("nvfp4", "e2m1", 16, 2, E2M1_MAX, "e4m3")


def mx_format(fmt: object, name: str = "fmt") -> MicroscalingFormat:
    """The MicroscalingFormat named `fmt` ("mxfp8" / "mxfp4"); errors name the argument."""
    if isinstance(fmt, MicroscalingFormat) and fmt.scale == "e8m0":
        return fmt
    if not isinstance(fmt, str) or fmt not in MX_FORMATS:
        raise ValueError(f"{name} must be one of {sorted(MX_FORMATS)}, got {fmt!r}")
    return MX_FORMATS[fmt]


def check_block_size(block_size: object, last_dim: int | None, name: str = "block_size") -> int:
    """A positive int dividing `last_dim` (None: not checked against a dim)."""
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise ValueError(f"{name} must be positive, got {block_size}")
    if last_dim is not None and last_dim % block_size:
        raise ValueError(
            f"{name} {block_size} does not divide the last dim of x ({last_dim}): blocks are "
            f"{block_size} consecutive elements along the last dim"
        )
    return block_size


def _exponent_field(v: Tensor) -> Tensor:
    """Unbiased exponent field of fp32 v (int32): floor(log2|v|) for a normal v, -127 for 0
    and fp32 subnormals, 128 for inf and NaN."""
    return ((v.view(torch.int32) >> 23) & 0xFF) - 127


def _pow2_e8m0(e: Tensor) -> Tensor:
    """2.0**e in fp32, exact, for integer e in [-127, 127] (2**-127 is an fp32 subnormal)."""
    return torch.where(e >= -126, _pow2(torch.clamp(e, min=-126)), 2.0**E8M0_MIN_EXPONENT)


def round_to_e2m1_ref(v: Tensor) -> Tensor:
    """fp32 v saturated to [-6, 6] and rounded to the nearest e2m1 value, ties to even (NaN
    stays NaN), in fp32 arithmetic."""
    v = torch.clamp(v.float(), -E2M1_MAX, E2M1_MAX)
    e = torch.clamp(_exponent_field(v), min=0) - 1  # quantum 2**e: 0.5, 0.5, 1, 2
    return torch.round(v * _pow2(-e)) * _pow2(e)


def round_element_ref(v: Tensor, fmt: MicroscalingFormat) -> Tensor:
    """fp32 v rounded to fmt's element (saturating, ties to even)."""
    if fmt.element == "e4m3":
        return round_to_float8_ref(v, E4M3)
    return round_to_e2m1_ref(v)


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """fp32 view (..., K // block_size, block_size) of x."""
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def mx_shared_exponent_ref(x: Tensor, fmt: MicroscalingFormat, block_size: int) -> Tensor:
    """int32 shared exponent s per block, shape (*x.shape[:-1], K // block_size); 128 marks a
    block holding an inf or a NaN (its scale is NaN)."""
    e = _exponent_field(_blocks(x, block_size).abs().amax(dim=-1))
    return torch.where(e == 128, 128, torch.clamp(e - fmt.emax, min=E8M0_MIN_EXPONENT))


def mx_scale_ref(x: Tensor, fmt: MicroscalingFormat, block_size: int) -> Tensor:
    """fp32 block scales X = 2**s (NaN for a block holding an inf or a NaN), shape
    (*x.shape[:-1], K // block_size)."""
    s = mx_shared_exponent_ref(x, fmt, block_size)
    return torch.where(s > 127, float("nan"), _pow2_e8m0(torch.clamp(s, max=127)))


def mx_scale_codes_ref(x: Tensor, fmt: MicroscalingFormat, block_size: int) -> Tensor:
    """uint8 e8m0 codes of the block scales: s + 127, 255 for NaN."""
    s = mx_shared_exponent_ref(x, fmt, block_size)
    return torch.where(s > 127, 255, s + 127).to(torch.uint8)


def mx_quantize_ref(x: Tensor, fmt: MicroscalingFormat, block_size: int) -> tuple[Tensor, Tensor]:
    """(q, s) of x's MX quantization: the elements q = round_element(x * 2**-s), fp32 values on
    the element's grid, shape (*x.shape[:-1], K // block_size, block_size), and the int32
    shared exponents s (128: a block holding an inf or a NaN, its scale NaN) of
    mx_shared_exponent_ref. The fake quant is q * 2**s; convert stores q and s as codes."""
    s = mx_shared_exponent_ref(x, fmt, block_size)
    clamped = torch.clamp(s, max=127).unsqueeze(-1)
    return round_element_ref(_blocks(x, block_size) * _pow2(-clamped), fmt), s


def mx_decode_scale_ref(s: Tensor) -> Tensor:
    """The fp32 block scales 2**s of shared exponents s (int32, NaN where s is 128)."""
    return torch.where(s > 127, float("nan"), _pow2_e8m0(torch.clamp(s, max=127)))


def mx_dequantize_ref(q: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """q * 2**s (NaN where s is 128), blocks flattened back along the last dim, cast once to
    `dtype`: the fake-quantized tensor of mx_quantize_ref's (q, s)."""
    return (q * mx_decode_scale_ref(s).unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quantize_mx_ref(x: Tensor, fmt: MicroscalingFormat, block_size: int) -> Tensor:
    """MXFP8 / MXFP4 fake quant of x with block scales from its own blocks, in x.dtype."""
    if x.numel() == 0:
        return x.clone()
    q, s = mx_quantize_ref(x, fmt, block_size)
    return mx_dequantize_ref(q, s, x.dtype).reshape(x.shape)


def nvfp4_tensor_scale_ref(x: Tensor, eps: float = FLOAT8_EPS) -> Tensor:
    """fp32 tensor scale s_t = max(amax, eps) / 2688 (0-dim; NaN / inf for a non-finite x)."""
    amax = torch.clamp(x.detach().float().abs().amax(), min=eps)  # NaN stays NaN
    return amax / NVFP4_TENSOR_DIVISOR


def nvfp4_block_scale_ref(x: Tensor, block_size: int, tensor_scale: Tensor) -> Tensor:
    """fp32 e4m3 block scales s_b = e4m3((amax_b / 6) / s_t), shape (*x.shape[:-1], K // bs)."""
    amax = _blocks(x, block_size).abs().amax(dim=-1)
    quotient = (amax / E2M1_MAX) / tensor_scale
    # e4m3 has no infinity: a block holding an inf (per_tensor_scale False) gets a NaN scale.
    return torch.where(torch.isinf(quotient), float("nan"), round_to_float8_ref(quotient, E4M3))


def fake_quantize_nvfp4_ref(
    x: Tensor,
    block_size: int = NVFP4.block_size,
    per_tensor_scale: bool = True,
    eps: float = FLOAT8_EPS,
) -> Tensor:
    """NVFP4 fake quant of x (e2m1 elements, e4m3 block scales, the fp32 tensor scale of x's
    own amax unless per_tensor_scale is False), in x.dtype."""
    if x.numel() == 0:
        return x.clone()
    q, s_t, s_b = nvfp4_quantize_ref(x, block_size, per_tensor_scale, eps)
    return nvfp4_dequantize_ref(q, s_t, s_b, x.dtype).reshape(x.shape)


def nvfp4_quantize_ref(
    x: Tensor,
    block_size: int = NVFP4.block_size,
    per_tensor_scale: bool = True,
    eps: float = FLOAT8_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """(q, s_t, s_b) of x's NVFP4 quantization: the e2m1 elements q (fp32 values, shape
    (*x.shape[:-1], K // block_size, block_size)), the fp32 tensor scale s_t (0-dim; 1.0
    without per_tensor_scale) and the e4m3 block scales s_b (fp32 values). The fake quant is
    q * (s_t * s_b); convert stores the three."""
    if per_tensor_scale:
        s_t = nvfp4_tensor_scale_ref(x, eps)
    else:
        s_t = torch.ones((), dtype=torch.float32, device=x.device)
    s_b = nvfp4_block_scale_ref(x, block_size, s_t)
    r = torch.where(s_b > 0, (1.0 / s_t) / s_b, 0.0).unsqueeze(-1)
    return round_to_e2m1_ref(_blocks(x, block_size) * r), s_t, s_b


def nvfp4_dequantize_ref(q: Tensor, s_t: Tensor, s_b: Tensor, dtype: torch.dtype) -> Tensor:
    """q * (s_t * s_b) (the decode scale one fp32 multiply), blocks flattened back along the
    last dim, cast once to `dtype`."""
    return (q * (s_t * s_b).unsqueeze(-1)).flatten(-2).to(dtype)
