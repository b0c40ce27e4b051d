"""Float8FakeQuantize: FP8 fake quant of weights (per row) and activations (per token)."""

from __future__ import annotations

import torch
from torch import Tensor

from triton_qat.numerics.float_formats import FLOAT8_EPS, check_granularity, float8_format
from triton_qat.ops.float_formats import fake_quantize_float8, float8_scale
from triton_qat.quantizers.base import FakeQuantizeBase


class Float8FakeQuantize(FakeQuantizeBase):
    """FP8 (float8_e4m3fn / float8_e5m2) fake quant with the scale from the current tensor.

    granularity "per_row" (a weight (N, K): one scale per output channel), "per_token" (an
    activation (..., K): one scale per token; the same formula, amax over the last dim) or
    "per_tensor". Scales are dynamic, made from each call's own tensor, so there is no
    observer state: the state_dict holds the fake_quant_enabled / observer_enabled flags
    only. Numerics and the straight-through gradient: triton_qat/numerics/float_formats.py.
    tq.nn.Linear applies it as a module (weight and input), then F.linear (eager; the fused
    FP8 GEMM comes with the Triton kernels).
    """

    is_dynamic = True

    def __init__(
        self,
        dtype: torch.dtype | str = "float8_e4m3fn",
        granularity: str = "per_row",
        eps: float = FLOAT8_EPS,
    ) -> None:
        super().__init__()
        fmt = float8_format(dtype, "dtype")
        self.dtype = fmt.dtype
        self.granularity = check_granularity(granularity, "granularity")
        if not isinstance(eps, float) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.eps = eps

    def calculate_qparams(self, x: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """The fp32 scale of `x` (dynamic scales exist only for an input)."""
        if x is None:
            raise ValueError("dynamic float8 scales are computed from an input: pass x")
        return float8_scale(x, self.dtype, self.granularity, self.eps)

    def observe(self, x: Tensor) -> None:
        """Nothing to observe: the scale comes from each call's own tensor."""

    def qparams(self) -> None:
        """None: no integer qparams (the fused integer GEMM does not take this quantizer)."""
        return None

    def forward(self, X: Tensor) -> Tensor:
        if not self._flag("fake_quant_enabled"):
            return X
        return fake_quantize_float8(X, self.dtype, self.granularity, self.eps)

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, dtype={self.dtype}, "
            f"granularity={self.granularity}, eps={self.eps}"
        )
