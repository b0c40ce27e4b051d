"""MXFakeQuantize (MXFP8, MXFP4) and NVFP4FakeQuantize: microscaling fake quant as modules."""

from __future__ import annotations

from torch import Tensor

from triton_qat.numerics.float_formats import FLOAT8_EPS
from triton_qat.numerics.microscaling import NVFP4, check_block_size, mx_format
from triton_qat.ops.microscaling import (
    fake_quantize_mx,
    fake_quantize_nvfp4,
    mx_scale,
    nvfp4_scales,
)
from triton_qat.quantizers.base import FakeQuantizeBase


class _MicroscalingFakeQuantize(FakeQuantizeBase):
    """Dynamic block scales made from each call's own tensor: no observer state, the state_dict
    holds the fake_quant_enabled / observer_enabled flags only. Blocks run along the last dim
    (K of a weight (N, K) and of an activation (..., K)). tq.nn.Linear runs the fused
    triton_qat.ops.mx_linear with it (weight and input), or applies it as a module when the
    other quantizer is not one of these."""

    is_dynamic = True
    block_size: int

    def observe(self, x: Tensor) -> None:
        """Nothing to observe: the scales come from each call's own tensor."""

    def qparams(self) -> None:
        """None: no integer qparams (the fused integer GEMM does not take this quantizer)."""
        return None


class MXFakeQuantize(_MicroscalingFakeQuantize):
    """MXFP8 (fmt "mxfp8": e4m3 elements) or MXFP4 ("mxfp4": e2m1) fake quant, blocks of
    `block_size` (32, OCP MX v1.0) along the last dim with e8m0 scales from each block's amax.
    Numerics and the straight-through gradient: triton_qat/numerics/microscaling.py."""

    def __init__(self, fmt: str = "mxfp8", block_size: int = 32) -> None:
        super().__init__()
        self.fmt = mx_format(fmt, "fmt").name
        self.block_size = check_block_size(block_size, None, "block_size")

    def calculate_qparams(self, x: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """The fp32 block scales of `x` (dynamic scales exist only for an input)."""
        if x is None:
            raise ValueError("dynamic MX block scales are computed from an input: pass x")
        return mx_scale(x, self.fmt, self.block_size)

    def forward(self, X: Tensor) -> Tensor:
        if not self._flag("fake_quant_enabled"):
            return X
        return fake_quantize_mx(X, self.fmt, self.block_size)

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, fmt={self.fmt}, "
            f"block_size={self.block_size}"
        )


class NVFP4FakeQuantize(_MicroscalingFakeQuantize):
    """NVFP4 fake quant: e2m1 elements in blocks of `block_size` (16) along the last dim, e4m3
    block scales and (per_tensor_scale) one fp32 scale from the current tensor's amax, for
    weights and activations alike (dynamic, as torchao's NVFP4FakeQuantizeConfig). Numerics
    and the straight-through gradient: triton_qat/numerics/microscaling.py."""

    def __init__(
        self,
        block_size: int = NVFP4.block_size,
        per_tensor_scale: bool = True,
        eps: float = FLOAT8_EPS,
    ) -> None:
        super().__init__()
        self.block_size = check_block_size(block_size, None, "block_size")
        if not isinstance(per_tensor_scale, bool):
            raise TypeError(
                f"per_tensor_scale must be a bool, got {type(per_tensor_scale).__name__}"
            )
        self.per_tensor_scale = per_tensor_scale
        if not isinstance(eps, float) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.eps = eps

    def calculate_qparams(self, x: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(tensor scale, block scales) of `x`, both fp32."""
        if x is None:
            raise ValueError("dynamic NVFP4 scales are computed from an input: pass x")
        return nvfp4_scales(x, self.block_size, self.per_tensor_scale, self.eps)

    def forward(self, X: Tensor) -> Tensor:
        if not self._flag("fake_quant_enabled"):
            return X
        return fake_quantize_nvfp4(X, self.block_size, self.per_tensor_scale, self.eps)

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, block_size={self.block_size}, "
            f"per_tensor_scale={self.per_tensor_scale}, eps={self.eps}"
        )
