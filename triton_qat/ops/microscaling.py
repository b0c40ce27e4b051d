"""MXFP8 / MXFP4 and NVFP4 fake quant as autograd ops (straight-through), eager only for now.

The rules are triton_qat/numerics/microscaling.py's; these ops run the eager reference on every
device and backend until the Triton kernels come.
"""

from __future__ import annotations

import torch
from torch import Tensor

from triton_qat.numerics.float_formats import FLOAT8_EPS
from triton_qat.numerics.microscaling import (
    NVFP4,
    check_block_size,
    fake_quantize_mx_ref,
    fake_quantize_nvfp4_ref,
    mx_format,
    mx_scale_ref,
    nvfp4_block_scale_ref,
    nvfp4_tensor_scale_ref,
)
from triton_qat.numerics.qparams import check_float_tensor


class _MXFakeQuant(torch.autograd.Function):
    """y = fq_mx(x) with block scales from x's own blocks; dx = dy (the scales are constants)."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt_name: str, block_size: int) -> Tensor:
        return fake_quantize_mx_ref(x, mx_format(fmt_name), block_size)

    @staticmethod
    def backward(ctx, dy: Tensor):
        return dy, None, None


class _NVFP4FakeQuant(torch.autograd.Function):
    """y = fq_nvfp4(x) with its tensor and block scales from x; dx = dy."""

    @staticmethod
    def forward(ctx, x: Tensor, block_size: int, per_tensor_scale: bool, eps: float) -> Tensor:
        return fake_quantize_nvfp4_ref(x, block_size, per_tensor_scale, eps)

    @staticmethod
    def backward(ctx, dy: Tensor):
        return dy, None, None, None


def _check_x(x: object, block_size: object) -> int:
    x = check_float_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim: blocks run along the last dim")
    return check_block_size(block_size, x.shape[-1], "block_size")


def _check_eps(eps: object) -> float:
    if not isinstance(eps, float) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return eps


def _check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def fake_quantize_mx(x: Tensor, fmt: str = "mxfp8", block_size: int = 32) -> Tensor:
    """MXFP8 ("mxfp8": e4m3 elements) or MXFP4 ("mxfp4": e2m1 elements) fake quant of x
    (fp32 / bf16 / fp16): blocks of `block_size` along the last dim, each with its e8m0 scale
    from the block's own amax (OCP MX v1.0). Straight-through backward: dx = dy. The output has
    x's dtype and shape."""
    fmt_obj = mx_format(fmt, "fmt")
    block_size = _check_x(x, block_size)
    return _MXFakeQuant.apply(x, fmt_obj.name, block_size)


def mx_scale(x: Tensor, fmt: str = "mxfp8", block_size: int = 32) -> Tensor:
    """The fp32 block scales (powers of two; NaN for a block holding an inf or a NaN) that
    fake_quantize_mx uses for x: shape (*x.shape[:-1], x.shape[-1] // block_size)."""
    fmt_obj = mx_format(fmt, "fmt")
    block_size = _check_x(x, block_size)
    return mx_scale_ref(x.detach(), fmt_obj, block_size)


def fake_quantize_nvfp4(
    x: Tensor,
    block_size: int = NVFP4.block_size,
    per_tensor_scale: bool = True,
    eps: float = FLOAT8_EPS,
) -> Tensor:
    """NVFP4 fake quant of x (fp32 / bf16 / fp16): e2m1 elements in blocks of `block_size`
    (16) along the last dim, e4m3 block scales, and (per_tensor_scale) one fp32 scale from the
    current tensor's amax (eps: its lower bound). Straight-through backward: dx = dy. The
    output has x's dtype and shape."""
    block_size = _check_x(x, block_size)
    per_tensor_scale = _check_flag(per_tensor_scale, "per_tensor_scale")
    eps = _check_eps(eps)
    return _NVFP4FakeQuant.apply(x, block_size, per_tensor_scale, eps)


def nvfp4_scales(
    x: Tensor,
    block_size: int = NVFP4.block_size,
    per_tensor_scale: bool = True,
    eps: float = FLOAT8_EPS,
) -> tuple[Tensor, Tensor]:
    """(tensor scale, block scales) that fake_quantize_nvfp4 uses for x, both fp32: a 0-dim
    tensor (1.0 without per_tensor_scale) and e4m3 values of shape
    (*x.shape[:-1], x.shape[-1] // block_size)."""
    block_size = _check_x(x, block_size)
    eps = _check_eps(eps)
    x = x.detach()
    if _check_flag(per_tensor_scale, "per_tensor_scale"):
        s_t = nvfp4_tensor_scale_ref(x, eps)
    else:
        s_t = torch.ones((), dtype=torch.float32, device=x.device)
    return s_t, nvfp4_block_scale_ref(x, block_size, s_t)
