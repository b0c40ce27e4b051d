"""FP8 ops: fake quant (autograd, straight-through) and the fused FP8 linear.

The rules are triton_qat/numerics/float_formats.py's. Both ops dispatch as the integer ops do
(functional.py): the Triton kernels (kernels/float8.py) where they run, else the eager
reference. fp8_linear is a torch.library custom op (opaque to torch.compile, no graph break)
with its backward registered, saving what F.linear saves (input, weight): the codes and
scales are recomputed in backward from the same tensors, bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from triton_qat.numerics.float_formats import (
    FLOAT8_EPS,
    check_granularity,
    choose_scale_float8_ref,
    fake_quantize_float8_dynamic_ref,
    float8_format,
)
from triton_qat.numerics.qparams import check_float_tensor
from triton_qat.ops.backend import fake_linear_grads, fake_linear_output, op_grads, use_triton
from triton_qat.ops.functional import _check_linear_args


def _float8_triton(device: torch.device) -> bool:
    """Whether the float8 kernels run on device: use_triton, and on a GPU float8 in Triton
    (compute capability 8.9 and up; Ampere's Triton has no e4m3fn). Elsewhere the eager
    reference (torch's float8 casts), bit for bit the same codes."""
    if not use_triton(device):
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _fake_quantize_float8(x: Tensor, dtype_name: str, granularity: str, eps: float) -> Tensor:
    """fq(x) by the Triton kernel where it runs, else the reference; bit for bit the same."""
    fmt = float8_format(dtype_name)
    if x.numel() == 0 or torch.compiler.is_compiling() or not _float8_triton(x.device):
        return fake_quantize_float8_dynamic_ref(x, fmt, granularity, eps)
    # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
    from triton_qat.kernels.float8 import fake_quantize_float8 as fq8_kernel

    rows = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    return fq8_kernel(rows, fmt, granularity != "per_tensor", eps).reshape(x.shape)


class _Float8FakeQuant(torch.autograd.Function):
    """y = fq8(x) with the scale from x's own amax; dx = dy (the scale is a constant)."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype_name: str, granularity: str, eps: float) -> Tensor:
        return _fake_quantize_float8(x, dtype_name, granularity, eps)

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


# --- the fused FP8 linear -------------------------------------------------------------------


def _specs(
    w_dtype: str, w_per_row: bool, w_eps: float, x_dtype: str, x_per_row: bool, x_eps: float
):
    from triton_qat.kernels.float8 import Float8Spec

    w_spec = Float8Spec(float8_format(w_dtype), w_per_row, w_eps)
    x_spec = Float8Spec(float8_format(x_dtype), x_per_row, x_eps) if x_dtype else None
    return w_spec, x_spec


def _gran(per_row: bool) -> str:
    return "per_row" if per_row else "per_tensor"


def _eager_operands(x, weight, w_dtype, w_per_row, w_eps, x_dtype, x_per_row, x_eps):
    """(fq(x) or x, fq(weight) cast to x's dtype) by the reference."""
    wq = fake_quantize_float8_dynamic_ref(weight, float8_format(w_dtype), _gran(w_per_row), w_eps)
    xq = x
    if x_dtype:
        xq = fake_quantize_float8_dynamic_ref(x, float8_format(x_dtype), _gran(x_per_row), x_eps)
    return xq, wq.to(x.dtype)


@torch.library.custom_op("triton_qat::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    w_dtype: str,
    w_per_row: bool,
    w_eps: float,
    x_dtype: str,
    x_per_row: bool,
    x_eps: float,
) -> Tensor:
    """F.linear(fq8(x), fq8(weight).to(x.dtype), bias) for x (M, K); x_dtype "" leaves x as is."""
    args = (w_dtype, w_per_row, w_eps, x_dtype, x_per_row, x_eps)
    if _float8_triton(x.device):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.float8 import fp8_linear_forward

        return fp8_linear_forward(x, weight, bias, *_specs(*args))
    xq, wq = _eager_operands(x, weight, *args)
    return F.linear(xq, wq, None if bias is None else bias.to(x.dtype))


_fp8_linear_op.register_fake(fake_linear_output)


@torch.library.custom_op("triton_qat::fp8_linear_backward", mutates_args=())
def _fp8_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    w_dtype: str,
    w_per_row: bool,
    w_eps: float,
    x_dtype: str,
    x_per_row: bool,
    x_eps: float,
    need_dx: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dw) = (dy @ fq8(w), (dy^T @ fq8(x)).to(w.dtype)), straight through (no mask); an
    unneeded gradient comes back as an empty tensor."""
    args = (w_dtype, w_per_row, w_eps, x_dtype, x_per_row, x_eps)
    grad_y = grad_y.to(x.dtype)
    if _float8_triton(x.device):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.float8 import fp8_linear_backward

        dx, dw = fp8_linear_backward(grad_y, x, weight, *_specs(*args), need_dx, need_dw)
    else:
        dx, dw = eager_straight_through(
            grad_y, weight, *_eager_operands(x, weight, *args), need_dx, need_dw
        )
    return op_grads(x, weight, dx, dw)


def eager_straight_through(
    grad_y: Tensor, weight: Tensor, xq: Tensor, wq: Tensor, need_dx: bool, need_dw: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The eager straight-through gradients of y = xq @ wq^T from the fake-quantized operands:
    dx = dy @ wq, dw = (dy^T @ xq) in the weight's dtype; None where not needed."""
    dx = grad_y @ wq if need_dx else None
    dw = (grad_y.t() @ xq).to(weight.dtype) if need_dw else None
    return dx, dw


def register_straight_through(op, backward_op) -> None:
    """Autograd of a fused fake-quant linear custom op op(x, weight, bias, *args) whose
    backward op backward_op(grad_y, x, weight, *args, need_dx, need_dw) gives (dx, dw), an
    unneeded one as an empty tensor: x and weight are saved (what F.linear saves; codes and
    scales are recomputed), db = grad_y.sum(0) in the bias's dtype. Shared by fp8_linear and
    ops/microscaling.py's mx_linear."""

    backward_op.register_fake(fake_linear_grads)

    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs[:3]
        ctx.save_for_backward(x, weight)
        ctx.args = inputs[3:]
        ctx.bias_dtype = None if bias is None else bias.dtype

    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_dx or need_dw:
            dx, dw = backward_op(grad_y, x, weight, *ctx.args, need_dx, need_dw)
        if need_db:
            db = grad_y.sum(0).to(ctx.bias_dtype)
        grads = (dx if need_dx else None, dw if need_dw else None, db)
        return grads + (None,) * len(ctx.args)

    op.register_autograd(backward, setup_context=setup_context)


register_straight_through(_fp8_linear_op, _fp8_linear_backward_op)


def _spec_args(dtype: object, granularity: object, eps: object, role: str, rows: tuple[str, ...]):
    fmt = float8_format(dtype, f"{role}_dtype")
    gran = check_granularity(granularity, f"{role}_granularity")
    if gran not in ("per_tensor", *rows):
        raise ValueError(
            f"{role}_granularity must be 'per_tensor' or one of {rows} for the {role}, got {gran!r}"
        )
    if not isinstance(eps, float) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"{role}_eps must be a positive float, got {eps!r}")
    return fmt.name, gran != "per_tensor", eps


def fp8_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    weight_dtype: torch.dtype | str = "float8_e4m3fn",
    weight_granularity: str = "per_row",
    weight_eps: float = FLOAT8_EPS,
    input_dtype: torch.dtype | str | None = "float8_e4m3fn",
    input_granularity: str = "per_token",
    input_eps: float = FLOAT8_EPS,
) -> Tensor:
    """F.linear(fq8(input), fq8(weight), bias), fused: FP8 fake quant of the weight (one scale
    per output row, or per tensor) and, unless input_dtype is None, of the input (one scale
    per token, a row of input.reshape(-1, K), or per tensor), each scale from the tensor's own
    amax. Straight-through backward: dx = dy @ fq8(w), dw = dy^T @ fq8(x), no mask.

    input (..., K) fp32 / bf16 / fp16; weight (N, K) in the input's dtype or fp32 (master
    weights: fake-quantized in fp32, then cast to the input dtype). Under autocast the input
    and bias are cast to the autocast dtype first. On the Triton path the GEMMs read the
    operands' float8 codes; on GPUs with FP8 tensor cores (and in the interpreter) the forward
    with both operands in one format is one FP8 GEMM (kernels/float8.py; within rounding of
    the composition). Else, and on the eager backend, the composition itself.
    """
    _check_linear_args(input, weight, bias)
    w_args = _spec_args(weight_dtype, weight_granularity, weight_eps, "weight", ("per_row",))
    x_args: tuple = ("", False, FLOAT8_EPS)
    if input_dtype is not None:
        x_args = _spec_args(
            input_dtype, input_granularity, input_eps, "input", ("per_token", "per_row")
        )
    if torch.is_autocast_enabled(input.device.type):
        ac_dtype = torch.get_autocast_dtype(input.device.type)
        input = input.to(ac_dtype)
        if bias is not None:
            bias = bias.to(ac_dtype)
        if weight.dtype not in (ac_dtype, torch.float32):
            weight = weight.to(ac_dtype)
    x2d = input.reshape(math.prod(input.shape[:-1]), weight.shape[1])
    y = torch.ops.triton_qat.fp8_linear(x2d, weight, bias, *w_args, *x_args)
    return y.reshape(*input.shape[:-1], weight.shape[0])


# --- a converted FP8 layer's forward ---------------------------------------------------------


@torch.library.custom_op("triton_qat::fp8_linear_codes", mutates_args=())
def _fp8_linear_codes_op(
    x: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    weight_dtype: torch.dtype,
    x_dtype: str,
    x_per_row: bool,
    x_eps: float,
) -> Tensor:
    """F.linear(fq8(x), (codes * scale).to(weight_dtype).to(x.dtype), bias) for x (M, K): the
    QAT fp8_linear's forward with the weight's codes as stored; x_dtype "" leaves x as is."""
    if _float8_triton(x.device) and weight_dtype in (x.dtype, torch.float32):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.float8 import fp8_linear_forward

        w_spec, x_spec = _specs(
            str(codes.dtype).removeprefix("torch."), True, 1.0, x_dtype, x_per_row, x_eps
        )
        return fp8_linear_forward(x, codes, bias, w_spec, x_spec, w_codes=(codes, scale))
    xq = x
    if x_dtype:
        xq = fake_quantize_float8_dynamic_ref(x, float8_format(x_dtype), _gran(x_per_row), x_eps)
    w = (codes.to(torch.float32) * scale.to(torch.float32)).to(weight_dtype).to(x.dtype)
    return F.linear(xq, w, None if bias is None else bias.to(x.dtype))


_fp8_linear_codes_op.register_fake(fake_linear_output)


def quantized_fp8_linear(
    input: Tensor,
    codes: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    weight_dtype: torch.dtype,
    input_dtype: str | None,
    input_granularity: str | None,
    input_eps: float,
) -> Tensor:
    """A converted FP8 linear's output (flow/convert_float8.py): what fp8_linear gives in eval
    for a weight whose float8 codes and fp32 scale (per row (N, 1), or (1,)) are these, the
    same kernels on the Triton path, bit for bit; the input fake-quantized per token / per
    tensor (input_dtype None: as is)."""
    x_args: tuple = ("", False, FLOAT8_EPS)
    if input_dtype is not None:
        x_args = (input_dtype, input_granularity != "per_tensor", input_eps)
    x2d = input.reshape(math.prod(input.shape[:-1]), codes.shape[1])
    y = torch.ops.triton_qat.fp8_linear_codes(x2d, codes, scale, bias, weight_dtype, *x_args)
    return y.reshape(*input.shape[:-1], codes.shape[0])
