"""FP8 fake quant as an autograd op (straight-through), eager only for now.

The rules are triton_qat/numerics/float_formats.py's. This op runs the eager reference on
every device and backend: the Triton kernels (standalone FP8 fake quant, and FP8 operands
fused into the linear's GEMM) come next and will be dispatched from here as the integer
ops are from functional.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton_qat.numerics.float_formats import (
    FLOAT8_EPS,
    check_granularity,
    choose_scale_float8_ref,
    fake_quantize_float8_dynamic_ref,
    float8_format,
)
from triton_qat.numerics.qparams import check_float_tensor


class _Float8FakeQuant(torch.autograd.Function):
    """y = fq8(x) with the scale from x's own amax; dx = dy (the scale is a constant)."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype_name: str, granularity: str, eps: float) -> Tensor:
        return fake_quantize_float8_dynamic_ref(x, float8_format(dtype_name), granularity, eps)

    @staticmethod
    def backward(ctx, dy: Tensor):
        return dy, None, None, None


def _check_eps(eps: object) -> float:
    if not isinstance(eps, float) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return eps


def fake_quantize_float8(
    x: Tensor,
    dtype: torch.dtype | str = "float8_e4m3fn",
    granularity: str = "per_tensor",
    eps: float = FLOAT8_EPS,
) -> Tensor:
    """FP8 fake quant of x (fp32 / bf16 / fp16) with its scale from its own amax.

    dtype: torch.float8_e4m3fn or torch.float8_e5m2 (or the name, "e4m3fn" / "e5m2").
    granularity: "per_tensor", or "per_row" / "per_token" (one scale per row of the last
    dim: per output channel of a weight (N, K), per token of an activation (..., K)).
    eps: lower bound of amax (a zero row gives zeros, not NaN). Straight-through backward:
    dx = dy. The output has x's dtype and shape.
    """
    check_float_tensor(x, "x")
    fmt = float8_format(dtype, "dtype")
    check_granularity(granularity, "granularity")
    eps = _check_eps(eps)
    if granularity != "per_tensor" and x.dim() == 0:
        raise ValueError(f"granularity {granularity!r} needs x with at least one dim")
    return _Float8FakeQuant.apply(x, fmt.name, granularity, eps)


def float8_scale(
    x: Tensor,
    dtype: torch.dtype | str = "float8_e4m3fn",
    granularity: str = "per_tensor",
    eps: float = FLOAT8_EPS,
) -> Tensor:
    """The fp32 scale fake_quantize_float8 uses for x: shape [1] * x.dim() per tensor,
    (*x.shape[:-1], 1) per row / token."""
    check_float_tensor(x, "x")
    fmt = float8_format(dtype, "dtype")
    check_granularity(granularity, "granularity")
    return choose_scale_float8_ref(x, fmt, granularity, _check_eps(eps))
