"""Autograd-aware ops: pick the Triton kernels or the eager reference for each call."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from triton_qat.numerics import reference
from triton_qat.numerics.qparams import (
    LinearQuant,
    NormQParams,
    PerTokenQParams,
    QParams,
    check_float_tensor,
    check_learnable_qparams,
    normalize,
)
from triton_qat.ops.backend import fake_linear_grads, fake_linear_output, op_grads, use_triton

# torch's CPU per-channel op converts q to int64 before clamping; below this bound on x / scale
# nothing wraps, and its results equal the reference's (tests/test_reference.py).
_TORCH_CPU_WRAP_BOUND = 2.0**62


def _torch_fused_applies(x: Tensor, nq: NormQParams) -> bool:
    """Whether torch's fused CPU fake-quant op computes exactly the reference here.

    It does per tensor, and per channel / group with an integer zero point unless some
    x / scale could reach 2**62 (+inf, NaN, zero, negative or tiny scales): one max over x
    and over the scales decides, cheaper than the ten passes of the reference formula. Not
    with a float zero point: its vectorized loop adds it in one FMA, but the scalar tail of a
    row (and its DEFAULT build) round twice, so results depend on where an element falls.
    """
    if x.device.type != "cpu" or nq.float_zero_point or x.numel() == 0:
        return False
    if torch.compiler.is_compiling():
        return False  # the reference: its check is a host sync, and torch's op has no fake
    if nq.granularity == "per_tensor":
        return True
    inv = reference.reciprocal(nq.scale)
    bound = x.max().float() * inv.max()
    return bool(((inv.min() > 0) & (bound < _TORCH_CPU_WRAP_BOUND)).item())


def fake_quantize_with_mask_eager(
    x: Tensor, nq: NormQParams, inv_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(fq(x), mask) in plain PyTorch: torch's fused CPU op where it equals the reference,
    the reference itself elsewhere. `inv_scale`, when given, must be 1 / nq.scale."""
    if not _torch_fused_applies(x, nq):
        return reference.fake_quantize_with_mask_ref(x, nq, inv_scale)
    xc = x.contiguous()
    if nq.granularity == "per_tensor":
        enabled = torch.ones(1, dtype=torch.long)
        y, mask = torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            xc, nq.scale, nq.zero_point, enabled, nq.quant_min, nq.quant_max
        )
        return y.reshape(x.shape), mask.reshape(x.shape)
    view = xc.view(nq.rows, nq.cols) if nq.params_on_cols else xc.view(-1, nq.channels, nq.cols)
    y, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
        view, nq.scale, nq.zero_point, 1, nq.quant_min, nq.quant_max
    )
    return y.reshape(x.shape), mask.reshape(x.shape)


def _kernels_run(device: torch.device) -> bool:
    """Whether the fake-quant kernels run: use_triton, and not while torch.compile traces (the
    kernels are plain launches, not custom ops; the reference is traced and compiled)."""
    return not torch.compiler.is_compiling() and use_triton(device)


def _forward(x: Tensor, nq: NormQParams, inv_scale: Tensor) -> Tensor:
    if _kernels_run(x.device):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.fake_quant import fake_quant_forward

        return fake_quant_forward(x, nq, inv_scale)
    return fake_quantize_with_mask_eager(x, nq)[0]


def _backward(x: Tensor, grad_y: Tensor, nq: NormQParams, inv_scale: Tensor) -> Tensor:
    if _kernels_run(x.device):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.fake_quant import fake_quant_backward

        return fake_quant_backward(x, grad_y, nq, inv_scale)
    return reference.fake_quantize_backward_ref(x, grad_y, nq, inv_scale)


class _FakeQuantizeFunction(torch.autograd.Function):
    """Straight-through fake quant. Saves x, 1/scale and a copy of the zero point; the mask
    is recomputed in the backward pass. An observer that updates the scale or zero point in
    place before backward does not change this call's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, nq: NormQParams, inv_scale: Tensor) -> Tensor:  # type: ignore[override]
        # The zero point is cloned (a few bytes) so in-place updates cannot reach backward.
        ctx.save_for_backward(x, inv_scale, nq.zero_point.clone())
        ctx.nq = nq._replace(scale=None, zero_point=None)
        return _forward(x, nq, inv_scale)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        x, inv_scale, zero_point = ctx.saved_tensors
        # The mask needs 1/scale and the zero point, not the scale itself.
        nq = ctx.nq._replace(zero_point=zero_point)
        return _backward(x, grad_y, nq, inv_scale), None, None


def fake_quantize(x: Tensor, qparams: QParams) -> Tensor:
    """Fake-quantize x with `qparams` (any granularity); differentiable straight-through."""
    if not isinstance(qparams, QParams):
        raise TypeError(f"qparams must be a triton_qat.QParams, got {type(qparams).__name__}")
    check_float_tensor(x, "x")
    # The zero point range check reads values on the host: not in a compiled graph.
    nq = normalize(x, qparams, check_zero_point=not torch.compiler.is_compiling())
    inv_scale = reference.reciprocal(nq.scale)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FakeQuantizeFunction.apply(x, nq, inv_scale)
    return _forward(x, nq, inv_scale)


def fake_quantize_per_tensor(
    x: Tensor, scale: float | Tensor, zero_point: int | Tensor, quant_min: int, quant_max: int
) -> Tensor:
    """torch.fake_quantize_per_tensor_affine, bit-exact; Triton kernels where they can run."""
    return fake_quantize(x, QParams(scale, zero_point, quant_min, quant_max))


def fake_quantize_per_channel(
    x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, quant_min: int, quant_max: int
) -> Tensor:
    """torch.fake_quantize_per_channel_affine, bit-exact (saturating at +inf: see reference)."""
    return fake_quantize(x, QParams(scale, zero_point, quant_min, quant_max, axis=axis))


def fake_quantize_per_group(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    group_size: int,
    quant_min: int,
    quant_max: int,
) -> Tensor:
    """Fake quant per group of `group_size` consecutive elements along the last dim.

    scale and zero_point have shape (*x.shape[:-1], x.shape[-1] // group_size).
    """
    return fake_quantize(x, QParams(scale, zero_point, quant_min, quant_max, group_size=group_size))


# --- fused fake-quant linear ------------------------------------------------------------------
#
# Registered as torch.library custom ops so torch.compile treats them as opaque calls (no
# graph break) and autograd saves exactly what F.linear saves (input, weight) plus qparams.


def per_token_qparams(x: Tensor, spec: PerTokenQParams) -> tuple[Tensor, Tensor, Tensor]:
    """(scale, 1 / scale, zero point) of each row of x (M, K): the light pass before a fused
    linear with a dynamic per-token input. Triton kernel or the reference, per the backend."""
    if use_triton(x.device):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels.per_token import per_token_qparams as per_token_qparams_triton

        return per_token_qparams_triton(x, spec)
    scale, zp = reference.per_token_qparams_ref(
        x, spec.quant_min, spec.quant_max, spec.symmetric, spec.symmetric_zero_point, spec.eps
    )
    return scale, reference.reciprocal(scale), zp


@torch.library.custom_op("triton_qat::per_token_qparams", mutates_args=())
def _per_token_qparams_op(
    x: Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    symmetric_zero_point: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """per_token_qparams as an opaque op for torch.compile."""
    spec = PerTokenQParams(quant_min, quant_max, symmetric, symmetric_zero_point, eps)
    return per_token_qparams(x, spec)


@_per_token_qparams_op.register_fake
def _(x, *args):
    m = x.shape[0]
    scale = x.new_empty((m,), dtype=torch.float32)
    return scale, torch.empty_like(scale), x.new_empty((m,), dtype=torch.int32)


@torch.library.custom_op("triton_qat::fq_linear", mutates_args=())
def _fq_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    w_scale: Tensor,
    w_inv: Tensor,
    w_zp: Tensor,
    w_qmin: int,
    w_qmax: int,
    group_size: int,
    x_scale: Tensor | None,
    x_inv: Tensor | None,
    x_zp: Tensor | None,
    x_qmin: int,
    x_qmax: int,
    x_per_row: bool = False,
) -> Tensor:
    w_args = (w_scale, w_inv, w_zp, w_qmin, w_qmax, group_size)
    lq = LinearQuant(*w_args, x_scale, x_inv, x_zp, x_qmin, x_qmax, x_per_row)
    if use_triton(x.device):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels import int_matmul

        return int_matmul.fused_forward(x, weight, bias, lq)
    return reference.fq_linear_ref(x, weight, bias, lq, fake_quantize_with_mask_eager)


_fq_linear_op.register_fake(fake_linear_output)


@torch.library.custom_op("triton_qat::fq_linear_backward", mutates_args=())
def _fq_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    w_scale: Tensor,
    w_inv: Tensor,
    w_zp: Tensor,
    w_qmin: int,
    w_qmax: int,
    group_size: int,
    x_scale: Tensor | None,
    x_inv: Tensor | None,
    x_zp: Tensor | None,
    x_qmin: int,
    x_qmax: int,
    x_per_row: bool,
    need_dx: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dw); an unneeded gradient comes back as an empty tensor."""
    w_args = (w_scale, w_inv, w_zp, w_qmin, w_qmax, group_size)
    lq = LinearQuant(*w_args, x_scale, x_inv, x_zp, x_qmin, x_qmax, x_per_row)
    grad_y = grad_y.to(x.dtype)
    if use_triton(x.device):
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels import int_matmul

        dx, dw = int_matmul.fused_backward(grad_y, x, weight, lq, need_dx, need_dw)
    else:
        dx, dw = reference.fq_linear_backward_ref(
            grad_y, x, weight, lq, need_dx, need_dw, fake_quantize_with_mask_eager
        )
    return op_grads(x, weight, dx, dw)


_fq_linear_backward_op.register_fake(fake_linear_grads)


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


def _fq_linear_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, w_scale, _, w_zp, w_qmin, w_qmax, group_size = inputs[:9]
    x_scale, _, x_zp, x_qmin, x_qmax, x_per_row = inputs[9:]
    # Exactly what F.linear saves (input, weight), plus copies of the qparams (small next to
    # the weight), so an observer updating them in place before backward changes nothing.
    # 1 / scale is recomputed in backward: the same op on the same values, bit for bit.
    # Per-token input qparams (x_per_row) are M scales and M zero points: saved rather than
    # recomputed, which would cost another pass over x for 8 bytes a row.
    ctx.save_for_backward(x, weight, w_scale.clone(), w_zp.clone(), _clone(x_scale), _clone(x_zp))
    ctx.ranges = (w_qmin, w_qmax, group_size, x_qmin, x_qmax, x_per_row)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _fq_linear_backward(ctx, grad_y):
    x, weight, w_scale, w_zp, x_scale, x_zp = ctx.saved_tensors
    w_inv = reference.reciprocal(w_scale)
    x_inv = None if x_scale is None else reference.reciprocal(x_scale)
    w_qmin, w_qmax, group_size, x_qmin, x_qmax, x_per_row = ctx.ranges
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx = dw = db = None
    if need_dx or need_dw:
        dx, dw = torch.ops.triton_qat.fq_linear_backward(
            grad_y,
            x,
            weight,
            w_scale,
            w_inv,
            w_zp,
            w_qmin,
            w_qmax,
            group_size,
            x_scale,
            x_inv,
            x_zp,
            x_qmin,
            x_qmax,
            x_per_row,
            need_dx,
            need_dw,
        )
    if need_db:
        db = grad_y.sum(0).to(ctx.bias_dtype)
    return (dx if need_dx else None, dw if need_dw else None, db) + (None,) * 12


_fq_linear_op.register_autograd(_fq_linear_backward, setup_context=_fq_linear_setup_context)


def _check_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_float_tensor(x, "input")
    check_float_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got {tuple(weight.shape)}"
        )
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"input's last dim must equal weight.shape[1] ({weight.shape[1]}), "
            f"got input of shape {tuple(x.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but input is on {x.device}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"weight dtype {weight.dtype} must equal the input's ({x.dtype}) or be float32 "
            "(master weights; fake-quantized then cast to the input dtype)"
        )
    if bias is not None:
        check_float_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but input is on {x.device}")
        if bias.dtype not in (x.dtype, weight.dtype):
            raise TypeError(f"bias dtype {bias.dtype} must equal the input's or the weight's")


def fq_linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    weight_qparams: QParams,
    input_qparams: QParams | PerTokenQParams | None = None,
) -> Tensor:
    """F.linear(fq(input, input_qparams), fq(weight, weight_qparams), bias), fused.

    input (..., K); weight (N, K), fp32 master weights allowed under a half-precision input
    (fake-quantized in fp32, then cast to the input dtype, as torch.ao QAT under autocast).
    weight_qparams: per tensor, per channel along axis 0 (output features), or per group along
    K. input_qparams: None, per tensor, or a PerTokenQParams (dynamic per token: each row of
    input.reshape(-1, K) fake-quantized with its own qparams, computed by a light pass over
    the input before the GEMM). Under autocast the input and bias are cast to the autocast
    dtype first. Differentiable: straight-through masks, recomputed in backward.
    """
    _check_linear_args(input, weight, bias)
    if torch.is_autocast_enabled(input.device.type):
        ac_dtype = torch.get_autocast_dtype(input.device.type)
        input = input.to(ac_dtype)
        if bias is not None:
            bias = bias.to(ac_dtype)
        if weight.dtype not in (ac_dtype, torch.float32):
            weight = weight.to(ac_dtype)
    x2d = input.reshape(math.prod(input.shape[:-1]), weight.shape[1])
    lq = linear_quant(x2d, weight, weight_qparams, input_qparams)
    if torch.compiler.is_compiling() or use_triton(x2d.device):
        y = torch.ops.triton_qat.fq_linear(x2d, weight, bias, *_op_args(lq))
    else:
        y = _EagerFqLinear.apply(x2d, weight, bias, lq)
    return y.reshape(*input.shape[:-1], weight.shape[0])


class _EagerFqLinear(torch.autograd.Function):
    """The eager path outside torch.compile: the composition torch.ao runs, saving the
    fake-quantized operands and masks (fastest on the CPU, where memory is not the point)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lq):  # type: ignore[override]
        ops = reference.fq_linear_operands(x, weight, lq, fake_quantize_with_mask_eager)
        ctx.save_for_backward(*ops)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return reference.linear_of_operands(ops, bias)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        ops = reference.LinearOperands(*ctx.saved_tensors)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw = reference.linear_grads_of_operands(
            grad_y.to(ops.xq.dtype), ops, ctx.weight_dtype, need_dx, need_dw
        )
        db = grad_y.sum(0).to(ctx.bias_dtype) if need_db else None
        return dx, dw, db, None


def _op_args(lq: LinearQuant) -> tuple:
    return (
        lq.w_scale,
        lq.w_inv,
        lq.w_zp,
        lq.w_qmin,
        lq.w_qmax,
        lq.group_size,
        lq.x_scale,
        lq.x_inv,
        lq.x_zp,
        lq.x_qmin,
        lq.x_qmax,
        lq.x_per_row,
    )


def linear_quant(
    x: Tensor,
    weight: Tensor,
    weight_qparams: QParams,
    input_qparams: QParams | PerTokenQParams | None,
) -> LinearQuant:
    """Check the qparams of a fused linear and put them in the kernels' form. A dynamic
    per-token input spec runs the per-token qparams pass over x (seen as (-1, K)) here."""
    if not isinstance(weight_qparams, QParams):
        raise TypeError(
            f"weight_qparams must be a triton_qat.QParams, got {type(weight_qparams).__name__}"
        )
    if weight_qparams.granularity == "per_channel" and weight_qparams.axis not in (0, -2):
        raise ValueError(
            "weight_qparams per channel must use axis 0 (output features), "
            f"got axis {weight_qparams.axis}"
        )
    # Data-dependent checks (zero point range) would break a torch.compile graph.
    check_zp = not torch.compiler.is_compiling()
    wn = normalize(weight, weight_qparams, check_zero_point=check_zp)
    x_args: tuple = (None, None, None, 0, 0)
    if isinstance(input_qparams, PerTokenQParams):
        spec = input_qparams
        # The qparams are constants for autograd, as in the eager per-token fake quant.
        rows = x.detach().reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            x_scale, x_inv, x_zp = torch.ops.triton_qat.per_token_qparams(
                rows,
                spec.quant_min,
                spec.quant_max,
                spec.symmetric,
                spec.symmetric_zero_point,
                spec.eps,
            )
        else:
            x_scale, x_inv, x_zp = per_token_qparams(rows, spec)
        x_args = (x_scale, x_inv, x_zp, spec.quant_min, spec.quant_max, True)
    elif input_qparams is not None:
        if not isinstance(input_qparams, QParams):
            raise TypeError(
                f"input_qparams must be a triton_qat.QParams, a PerTokenQParams or None, got "
                f"{type(input_qparams).__name__}"
            )
        if input_qparams.granularity != "per_tensor":
            raise ValueError(f"input_qparams must be per tensor, got {input_qparams.granularity}")
        xn = normalize(x, input_qparams, check_zero_point=check_zp)
        x_args = (
            xn.scale,
            reference.reciprocal(xn.scale),
            xn.zero_point,
            xn.quant_min,
            xn.quant_max,
        )
    return LinearQuant(
        wn.scale,
        reference.reciprocal(wn.scale),
        wn.zero_point,
        wn.quant_min,
        wn.quant_max,
        weight_qparams.group_size or 0,
        *x_args,
    )


# --- learnable scale / zero point (LSQ) ---------------------------------------------------------


def _learnable_norm(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None
) -> NormQParams:
    """The normalized qparams of the forward: zero point clamp(rne(zp)), as int32."""
    zp = reference.learnable_zero_point(zero_point, qmin, qmax, trunc=False)
    qp = QParams(scale, zp.to(torch.int32), qmin, qmax, axis=axis)
    return normalize(x, qp, check_zero_point=not torch.compiler.is_compiling())


def learnable_backward_norm(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None
) -> NormQParams:
    """The normalized qparams of the backward: the zero point as an fp32 integer value,
    trunc(clamp(zp + 0.5)) per tensor (torch's quirk), clamp(rne(zp)) per channel."""
    zp = reference.learnable_zero_point(zero_point, qmin, qmax, trunc=axis is None)
    return _learnable_norm(x, scale, zero_point, qmin, qmax, axis)._replace(
        zero_point=zp.reshape(-1), float_zero_point=True
    )


class _LearnableFakeQuantizeFunction(torch.autograd.Function):
    """torch._fake_quantize_learnable_per_{tensor,channel}_affine: fake quant with a rounded
    zero point forward; dx, dscale and dzp (LSQ, scaled by grad_factor) backward. Saves x and
    copies of scale and zero point (an optimizer step before backward changes nothing)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor):  # type: ignore[override]
        nq = _learnable_norm(x, scale, zero_point, qmin, qmax, axis)
        ctx.save_for_backward(x, scale.detach().clone(), zero_point.detach().clone())
        ctx.args = (qmin, qmax, axis, grad_factor)
        return _forward(x, nq, reference.reciprocal(nq.scale))

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax, axis, grad_factor = ctx.args
        nq = learnable_backward_norm(x, scale, zero_point, qmin, qmax, axis)
        if _kernels_run(x.device):
            # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
            from triton_qat.kernels.learnable import learnable_fake_quant_backward

            dx, dscale, dzp = learnable_fake_quant_backward(
                x, grad_y, nq, reference.reciprocal(nq.scale), grad_factor
            )
        else:
            dx, dscale, dzp = reference.fake_quantize_learnable_backward_ref(
                x, grad_y, nq, axis, grad_factor
            )
        dscale, dzp = dscale.reshape(scale.shape), dzp.reshape(zero_point.shape)
        return dx, dscale, dzp, None, None, None, None


def _fake_quantize_learnable(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    axis: int | None,
    quant_min: int,
    quant_max: int,
    grad_factor: float,
) -> Tensor:
    check_learnable_qparams(x, scale, zero_point)
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, (int, float)):
        raise TypeError(f"grad_factor must be a float, got {type(grad_factor).__name__}")
    if axis is not None and not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for an input with {x.dim()} dims")
    axis = None if axis is None else axis % x.dim()
    needs_grad = x.requires_grad or scale.requires_grad or zero_point.requires_grad
    if torch.is_grad_enabled() and needs_grad:
        return _LearnableFakeQuantizeFunction.apply(
            x, scale, zero_point, quant_min, quant_max, axis, float(grad_factor)
        )
    nq = _learnable_norm(x, scale, zero_point, quant_min, quant_max, axis)
    return _forward(x, nq, reference.reciprocal(nq.scale))


def fake_quantize_learnable(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> Tensor:
    """torch._fake_quantize_learnable_per_tensor_affine: differentiable in x, scale and
    zero_point (LSQ). scale and zero_point: float32 tensors of one element (nn.Parameters);
    the zero point is rounded (half to even) and clamped in the forward. The gradients of
    scale and zero point are scaled by grad_factor (1 / sqrt(numel * quant_max) in LSQ)."""
    return _fake_quantize_learnable(x, scale, zero_point, None, quant_min, quant_max, grad_factor)


def fake_quantize_learnable_per_channel(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> Tensor:
    """torch._fake_quantize_learnable_per_channel_affine: as fake_quantize_learnable with one
    float32 scale and zero point per index along `axis` (shape (x.shape[axis],))."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    return _fake_quantize_learnable(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
