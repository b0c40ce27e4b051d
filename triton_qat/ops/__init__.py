"""Layer 3, ops: autograd Functions and torch.library custom ops, and the backend choice that
sends each call to the Triton kernels (layer 2) or the eager reference (layer 1).

functional.py holds the ops, backend.py the "auto" / "triton" / "eager" switch;
float_formats.py the FP8 fake quant and the fused FP8 linear, microscaling.py the MXFP8 /
MXFP4 / NVFP4 fake quant and the fused microscaling linear.
"""

from triton_qat.ops.backend import get_backend, set_backend, use_backend, use_triton
from triton_qat.ops.float_formats import fake_quantize_float8, float8_scale, fp8_linear
from triton_qat.ops.functional import (
    fake_quantize,
    fake_quantize_learnable,
    fake_quantize_learnable_per_channel,
    fake_quantize_per_channel,
    fake_quantize_per_group,
    fake_quantize_per_tensor,
    fq_linear,
    per_token_qparams,
)
from triton_qat.ops.microscaling import (
    fake_quantize_mx,
    fake_quantize_nvfp4,
    mx_linear,
    mx_scale,
    nvfp4_scales,
)

__all__ = [
    "fake_quantize",
    "fake_quantize_float8",
    "fake_quantize_learnable",
    "fake_quantize_learnable_per_channel",
    "fake_quantize_mx",
    "fake_quantize_nvfp4",
    "fake_quantize_per_channel",
    "fake_quantize_per_group",
    "fake_quantize_per_tensor",
    "float8_scale",
    "fp8_linear",
    "fq_linear",
    "get_backend",
    "mx_linear",
    "mx_scale",
    "nvfp4_scales",
    "per_token_qparams",
    "set_backend",
    "use_backend",
    "use_triton",
]
