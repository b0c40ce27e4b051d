"""MXFP8 / MXFP4 and NVFP4 fake quant as autograd ops (straight-through), and the fused linear.

The rules are triton_qat/numerics/microscaling.py's. The ops dispatch as the FP8 ops do
(float_formats.py): the Triton kernels (kernels/microscaling.py) where the float8 kernels run,
else the eager reference; bit for bit the same. mx_linear is a torch.library custom op with its
backward registered, saving what F.linear saves (input, weight): codes and scales are
recomputed in backward from the same tensors, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_qat.numerics.float_formats import FLOAT8_EPS
from triton_qat.numerics.microscaling import (
    MX_FORMATS,
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
from triton_qat.ops.backend import fake_linear_output, op_grads
from triton_qat.ops.float_formats import (
    _float8_triton,
    eager_straight_through,
    register_straight_through,
)
from triton_qat.ops.functional import _check_linear_args


def _kernel_runs(x: Tensor) -> bool:
    """Whether the microscaling kernels take x: where the float8 kernels run (their codes are
    float8_e4m3fn), not while torch.compile traces (the reference is traceable)."""
    return x.numel() > 0 and not torch.compiler.is_compiling() and _float8_triton(x.device)


def _fake_quantize_kernel(x: Tensor, fmt_name: str, block_size: int, pts: bool, eps: float):
    # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
    from triton_qat.kernels.microscaling import MicroscalingSpec, fake_quantize_microscaling

    rows = x.reshape(-1, x.shape[-1])
    spec = MicroscalingSpec(fmt_name, block_size, pts, eps)
    return fake_quantize_microscaling(rows, spec).reshape(x.shape)


class _MXFakeQuant(torch.autograd.Function):
    """y = fq_mx(x) with block scales from x's own blocks; dx = dy (the scales are constants)."""

    @staticmethod
    def forward(ctx, x: Tensor, fmt_name: str, block_size: int) -> Tensor:
        if _kernel_runs(x):
            return _fake_quantize_kernel(x, fmt_name, block_size, True, FLOAT8_EPS)
        return fake_quantize_mx_ref(x, mx_format(fmt_name), block_size)

    @staticmethod
    def backward(ctx, dy: Tensor):
        return dy, None, None


class _NVFP4FakeQuant(torch.autograd.Function):
    """y = fq_nvfp4(x) with its tensor and block scales from x; dx = dy."""

    @staticmethod
    def forward(ctx, x: Tensor, block_size: int, per_tensor_scale: bool, eps: float) -> Tensor:
        if _kernel_runs(x):
            return _fake_quantize_kernel(x, "nvfp4", block_size, per_tensor_scale, eps)
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


# --- the fused microscaling linear -------------------------------------------------------------


def _reference_fq(t: Tensor, fmt: str, block: int, pts: bool, eps: float) -> Tensor:
    if fmt == "nvfp4":
        return fake_quantize_nvfp4_ref(t, block, pts, eps)
    return fake_quantize_mx_ref(t, mx_format(fmt), block)


def _specs(w_fmt, w_block, w_pts, w_eps, x_fmt, x_block, x_pts, x_eps):
    from triton_qat.kernels.microscaling import MicroscalingSpec

    w_spec = MicroscalingSpec(w_fmt, w_block, w_pts, w_eps)
    x_spec = MicroscalingSpec(x_fmt, x_block, x_pts, x_eps) if x_fmt else None
    return w_spec, x_spec


def _eager_operands(x, weight, w_fmt, w_block, w_pts, w_eps, x_fmt, x_block, x_pts, x_eps):
    """(fq(x) or x, fq(weight) cast to x's dtype) by the reference."""
    wq = _reference_fq(weight, w_fmt, w_block, w_pts, w_eps)
    xq = _reference_fq(x, x_fmt, x_block, x_pts, x_eps) if x_fmt else x
    return xq, wq.to(x.dtype)


@torch.library.custom_op("triton_qat::mx_linear", mutates_args=())
def _mx_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    w_fmt: str,
    w_block: int,
    w_pts: bool,
    w_eps: float,
    x_fmt: str,
    x_block: int,
    x_pts: bool,
    x_eps: float,
) -> Tensor:
    """F.linear(fq(x), fq(weight).to(x.dtype), bias) for x (M, K); x_fmt "" leaves x as is."""
    args = (w_fmt, w_block, w_pts, w_eps, x_fmt, x_block, x_pts, x_eps)
    if _float8_triton(x.device):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.microscaling import mx_linear_forward

        return mx_linear_forward(x, weight, bias, *_specs(*args))
    xq, wq = _eager_operands(x, weight, *args)
    return F.linear(xq, wq, None if bias is None else bias.to(x.dtype))


_mx_linear_op.register_fake(fake_linear_output)


@torch.library.custom_op("triton_qat::mx_linear_backward", mutates_args=())
def _mx_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    w_fmt: str,
    w_block: int,
    w_pts: bool,
    w_eps: float,
    x_fmt: str,
    x_block: int,
    x_pts: bool,
    x_eps: float,
    need_dx: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dw) = (dy @ fq(w), (dy^T @ fq(x)).to(w.dtype)), straight through (no mask); an
    unneeded gradient comes back as an empty tensor."""
    args = (w_fmt, w_block, w_pts, w_eps, x_fmt, x_block, x_pts, x_eps)
    grad_y = grad_y.to(x.dtype)
    if _float8_triton(x.device):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.microscaling import mx_linear_backward

        dx, dw = mx_linear_backward(grad_y, x, weight, *_specs(*args), need_dx, need_dw)
    else:
        dx, dw = eager_straight_through(
            grad_y, weight, *_eager_operands(x, weight, *args), need_dx, need_dw
        )
    return op_grads(x, weight, dx, dw)


register_straight_through(_mx_linear_op, _mx_linear_backward_op)


def _operand_args(fmt: object, block_size: object, pts: object, eps: object, role: str, k: int):
    """(format name, block size, per_tensor_scale, eps) of one operand, checked; errors name
    the argument."""
    if not isinstance(fmt, str) or fmt not in (*MX_FORMATS, NVFP4.name):
        raise ValueError(f"{role}_format must be 'mxfp8', 'mxfp4' or 'nvfp4', got {fmt!r}")
    default = NVFP4.block_size if fmt == "nvfp4" else 32
    block = default if block_size is None else block_size
    block = check_block_size(block, None, f"{role}_block_size")
    if k % block:
        raise ValueError(
            f"{role}_block_size {block} does not divide in_features ({k}): blocks are "
            f"{block} consecutive elements along K"
        )
    pts = _check_flag(pts, f"{role}_per_tensor_scale")
    if not isinstance(eps, float) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{role}_eps must be a positive float, got {eps!r}")
    return fmt, block, pts, eps


def mx_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    weight_format: str = "mxfp8",
    weight_block_size: int | None = None,
    weight_per_tensor_scale: bool = True,
    weight_eps: float = FLOAT8_EPS,
    input_format: str | None = "mxfp8",
    input_block_size: int | None = None,
    input_per_tensor_scale: bool = True,
    input_eps: float = FLOAT8_EPS,
) -> Tensor:
    """F.linear(fq(input), fq(weight), bias), fused, with microscaling fake quant: "mxfp8",
    "mxfp4" (e8m0 block scales, blocks of 32 by default) or "nvfp4" (e4m3 block scales, blocks
    of 16 by default, and unless per_tensor_scale is False an fp32 tensor scale from the
    tensor's own amax, floored at eps) for the weight and, unless input_format is None, for the
    input (dynamic: each call's own blocks). Blocks run along K (in_features) for both.
    Straight-through backward: dx = dy @ fq(w), dw = dy^T @ fq(x), no mask.

    input (..., K) fp32 / bf16 / fp16; weight (N, K) in the input's dtype or fp32 (master
    weights: fake-quantized in fp32, then cast to the input dtype). Under autocast the input
    and bias are cast to the autocast dtype first. On the Triton path the GEMMs read the
    operands' element codes (float8_e4m3fn) and block scales, so their tiles are the fq tiles
    bit for bit; else, and on the eager backend, the composition itself.
    """
    _check_linear_args(input, weight, bias)
    k = weight.shape[1]
    w_args = _operand_args(
        weight_format, weight_block_size, weight_per_tensor_scale, weight_eps, "weight", k
    )
    x_args: tuple = ("", 1, True, FLOAT8_EPS)
    if input_format is not None:
        x_args = _operand_args(
            input_format, input_block_size, input_per_tensor_scale, input_eps, "input", k
        )
    if torch.is_autocast_enabled(input.device.type):
        ac_dtype = torch.get_autocast_dtype(input.device.type)
        input = input.to(ac_dtype)
        if bias is not None:
            bias = bias.to(ac_dtype)
        if weight.dtype not in (ac_dtype, torch.float32):
            weight = weight.to(ac_dtype)
    x2d = input.reshape(math.prod(input.shape[:-1]), k)
    y = torch.ops.triton_qat.mx_linear(x2d, weight, bias, *w_args, *x_args)
    return y.reshape(*input.shape[:-1], weight.shape[0])


# --- a converted microscaling layer's forward ------------------------------------------------


@torch.library.custom_op("triton_qat::mx_linear_codes", mutates_args=())
def _mx_linear_codes_op(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    weight_dtype: torch.dtype,
    x_fmt: str,
    x_block: int,
    x_pts: bool,
    x_eps: float,
) -> Tensor:
    """F.linear(fq(x), (codes * scale per block).to(weight_dtype).to(x.dtype), bias) for x
    (M, K), codes (N, K) float8_e4m3fn element values, scale (N, K // block) fp32 decode
    scales: mx_linear's forward with the weight as stored; x_fmt "" leaves x as is."""
    n, k = codes.shape
    block = k // scale.shape[1]
    if _float8_triton(x.device) and weight_dtype in (x.dtype, torch.float32):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.microscaling import mx_linear_forward

        w_spec, x_spec = _specs("mxfp8", block, False, FLOAT8_EPS, x_fmt, x_block, x_pts, x_eps)
        return mx_linear_forward(x, codes, bias, w_spec, x_spec, w_codes=(codes, scale))
    xq = _reference_fq(x, x_fmt, x_block, x_pts, x_eps) if x_fmt else x
    q = codes.to(torch.float32).reshape(n, k // block, block)
    w = (q * scale.to(torch.float32).unsqueeze(-1)).reshape(n, k).to(weight_dtype)
    return F.linear(xq, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


_mx_linear_codes_op.register_fake(fake_linear_output)


def quantized_mx_linear(
    input: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    weight_dtype: torch.dtype,
    input_quant: tuple | None,
) -> Tensor:
    """A converted microscaling linear's output (flow/convert_microscaling.py): what mx_linear
    gives in eval for a weight of these element codes (float8_e4m3fn (N, K)) and fp32 block
    decode scales (N, K // block: 2**s for MX, s_t * s_b for NVFP4), the same kernels on the
    Triton path, bit for bit. input_quant: (format, block size, tensor scale, eps) of the
    dynamic input fake quant, or None."""
    x_args: tuple = ("", 1, True, FLOAT8_EPS)
    if input_quant is not None:
        fmt, block, pts, eps = input_quant
        x_args = (str(fmt), int(block), bool(pts), float(eps))
    x2d = input.reshape(math.prod(input.shape[:-1]), codes.shape[1])
    y = torch.ops.triton_qat.mx_linear_codes(x2d, codes, scale, bias, weight_dtype, *x_args)
    return y.reshape(*input.shape[:-1], codes.shape[0])
