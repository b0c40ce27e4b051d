"""Dynamic per-token fake quant of activations (torchao's 8da4w / w8a8 recipes)."""

from __future__ import annotations

import torch
from torch import Tensor

from triton_qat.numerics.observer_formulas import (
    PER_TENSOR_SCHEMES,
    dtype_range,
    per_token_spec,
)
from triton_qat.numerics.qparams import PerTokenQParams, QParams
from triton_qat.numerics.reference import per_token_qparams_ref
from triton_qat.ops.functional import (
    fake_quantize_per_channel,
)
from triton_qat.quantizers.base import FakeQuantizeBase


def per_token_qparams(
    x: Tensor,
    quant_min: int,
    quant_max: int,
    qscheme: torch.qscheme = torch.per_tensor_affine,
    dtype: torch.dtype = torch.qint8,
    eps: float = torch.finfo(torch.float32).eps,
) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) of each row of x.reshape(-1, x.shape[-1]) from its own min / max,
    with torch.ao's Python observer formulas (symmetric or affine per `qscheme`)."""
    spec = per_token_spec(quant_min, quant_max, qscheme, dtype, eps)
    rows = x.detach().reshape(-1, x.shape[-1])
    return per_token_qparams_ref(
        rows, quant_min, quant_max, spec.symmetric, spec.symmetric_zero_point, spec.eps
    )


def fake_quantize_per_token(
    x: Tensor,
    quant_min: int,
    quant_max: int,
    qscheme: torch.qscheme = torch.per_tensor_affine,
    dtype: torch.dtype = torch.qint8,
    eps: float = torch.finfo(torch.float32).eps,
) -> Tensor:
    """Dynamic per-token fake quant: each row (token) with its own qparams; straight-through
    for x, the qparams are constants for autograd."""
    return fake_quantize_per_token_spec(
        x, per_token_spec(quant_min, quant_max, qscheme, dtype, eps)
    )


def fake_quantize_per_token_spec(x: Tensor, spec: PerTokenQParams) -> Tensor:
    """fake_quantize_per_token with the quantizer given as a PerTokenQParams."""
    if x.numel() == 0:
        return x
    rows = x.reshape(-1, x.shape[-1])
    scale, zero_point = per_token_qparams_ref(
        rows.detach(),
        spec.quant_min,
        spec.quant_max,
        spec.symmetric,
        spec.symmetric_zero_point,
        spec.eps,
    )
    y = fake_quantize_per_channel(rows, scale, zero_point, 0, spec.quant_min, spec.quant_max)
    return y.reshape(x.shape)


class DynamicPerTokenFakeQuantize(FakeQuantizeBase):
    """Dynamic per-token fake quant of activations (torchao's 8da4w / w8a8 recipes).

    Each row along the last dim (a token) gets its own qparams from its current min / max,
    with the formulas of torch.ao's Python observers (symmetric or affine per `qscheme`);
    nothing is kept between calls, so there is no observer state (fake_quantize_per_token).
    """

    is_dynamic = True

    def __init__(
        self,
        dtype: torch.dtype = torch.qint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int | None = None,
        quant_max: int | None = None,
        eps: float = torch.finfo(torch.float32).eps,
    ) -> None:
        super().__init__()
        if qscheme not in PER_TENSOR_SCHEMES:
            raise ValueError(
                "qscheme selects the per-token formula: per_tensor_affine or "
                f"per_tensor_symmetric, got {qscheme}"
            )
        self.dtype, self.qscheme, self.eps = dtype, qscheme, eps
        if quant_min is None or quant_max is None:
            quant_min, quant_max = dtype_range(dtype)
        self.quant_min, self.quant_max = quant_min, quant_max

    def calculate_qparams(self, x: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """Per-token (scale, zero_point) of `x`: dynamic qparams exist only for an input."""
        if x is None:
            raise ValueError("dynamic per-token qparams are computed from an input: pass x")
        return per_token_qparams(
            x, self.quant_min, self.quant_max, self.qscheme, self.dtype, self.eps
        )

    def observe(self, x: Tensor) -> None:
        """Nothing to observe: the qparams come from each call's own tokens."""

    def qparams(self) -> QParams | None:
        """None: per-token qparams exist only for a given input (calculate_qparams(x))."""
        return None

    def per_token_spec(self) -> PerTokenQParams | None:
        """This quantizer as the fused linear's dynamic input spec (None when fake quant is
        disabled): the GEMM computes each row's qparams from the input it is given."""
        if not self._flag("fake_quant_enabled"):
            return None
        return per_token_spec(self.quant_min, self.quant_max, self.qscheme, self.dtype, self.eps)

    def forward(self, X: Tensor) -> Tensor:
        if not self._flag("fake_quant_enabled"):
            return X
        return fake_quantize_per_token(
            X, self.quant_min, self.quant_max, self.qscheme, self.dtype, self.eps
        )

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, dtype={self.dtype}, "
            f"qscheme={self.qscheme}, quant_min={self.quant_min}, quant_max={self.quant_max}"
        )
