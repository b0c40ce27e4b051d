"""Autograd-aware ops: pick the Triton kernels or the eager reference for each call."""

from __future__ import annotations

import torch
from torch import Tensor

from triton_qat import reference
from triton_qat._backend import use_triton
from triton_qat.qparams import NormQParams, QParams, check_float_tensor, normalize


def _forward(x: Tensor, nq: NormQParams, inv_scale: Tensor) -> Tensor:
    if use_triton(x.device):
        from triton_qat.kernels.fake_quant import fake_quant_forward

        return fake_quant_forward(x, nq, inv_scale)
    return reference.fake_quantize_ref(x, nq)


def _backward(x: Tensor, grad_y: Tensor, nq: NormQParams, inv_scale: Tensor) -> Tensor:
    if use_triton(x.device):
        from triton_qat.kernels.fake_quant import fake_quant_backward

        return fake_quant_backward(x, grad_y, nq, inv_scale)
    return reference.fake_quantize_backward_ref(x, grad_y, nq, inv_scale)


class _FakeQuantizeFunction(torch.autograd.Function):
    """Straight-through fake quant. Saves x, 1/scale and the zero point; the mask is
    recomputed in the backward pass. 1/scale is a fresh tensor, so an observer that updates
    the scale in place before backward does not change this call's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, nq: NormQParams, inv_scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, inv_scale, nq.zero_point)
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
    nq = normalize(x, qparams)
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
