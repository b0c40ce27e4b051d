"""Layer 4, quantizers: observer and fake-quantize modules, drop-ins for torch.ao.quantization's.

The observers (MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver,
MovingAveragePerChannelMinMaxObserver) take the same arguments, hold the same buffers and
state_dict entries, and compute the same scale and zero point, bit for bit, as torch.ao's
classes of the same name. PerGroupMinMaxObserver adds per-group statistics (groups of
`group_size` consecutive elements along the last dim).

FakeQuantize and FusedMovingAvgObsFakeQuantize reproduce torch.ao's modules (buffers,
state_dict keys, observer updates, numerics of torch.fused_moving_average_obs_fake_quant),
but fake-quantize through triton_qat.ops, so they run the Triton kernels on the GPU. Both
expose `observe(x)` (the statistics half of forward) and `qparams()` (the current scale and
zero point as a QParams) for the fused linear.

Where the Triton path runs (triton_qat.ops.backend.use_triton: CUDA, or the CPU under
TRITON_INTERPRET=1), the observers' statistics, running updates and qparams come from
triton_qat.kernels.observe, which mirrors the eager code bit for bit (two launches, no
host sync); the eager code runs elsewhere, and for non-float inputs, non-fp32 statistics
buffers and ranges beyond +-2**20.

Differences from torch.ao, all deliberate:
- Every scale and zero point is computed with torch's CPU formula on every device: torch on
  CUDA multiplies by the reciprocal where its CPU kernels divide by a Python number, and its
  fused CUDA kernel has its own qparam code (NUMERICS.md: the small-scale cutoff is CPU only).
  Here divisions are true divisions everywhere.
- Inputs of any float dtype (fp16 and bf16 included) work: statistics are taken in fp32 and
  the output keeps the input dtype (torch's fused CPU op refuses bf16).
- FakeQuantize derives its qparams from the observer without calculate_qparams()'s host
  synchronisations (validity check, float() of 0-dim results); calculate_qparams() itself
  keeps torch.ao's checks and warnings.
- Bad arguments raise ValueError / NotImplementedError where torch.ao asserts.
- Per-channel fake quant takes a negative ch_axis, and FusedMovingAvgObsFakeQuantize any
  ch_axis (torch's ops raise for both).
- per_channel_affine_float_qparams (float zero points per channel, torch.ao's embedding
  qconfigs) works in FakeQuantize and the per-channel observers; FusedMovingAvgObsFakeQuantize
  refuses it, as torch's fused op takes integer zero points.

Float8FakeQuantize fake-quantizes to float8_e4m3fn / float8_e5m2 with dynamic scales (per row
of a weight, per token of an activation, or per tensor); it has no observer and no torch.ao
counterpart (torchao's Float8FakeQuantizer is the nearest; numerics/float_formats.py).
MXFakeQuantize (MXFP8 / MXFP4: e8m0 scales per block of 32) and NVFP4FakeQuantize (e4m3 scales
per block of 16 and an fp32 tensor scale) do the same for the microscaling formats, blocks
along the last dim (numerics/microscaling.py).

torch.ao is optional: without it the base classes are plain nn.Modules with the same buffers
and methods.
"""

from triton_qat.quantizers.base import FakeQuantizeBase, ObserverBase
from triton_qat.quantizers.fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize
from triton_qat.quantizers.float_formats import Float8FakeQuantize
from triton_qat.quantizers.learnable import LearnableFakeQuantize
from triton_qat.quantizers.microscaling import MXFakeQuantize, NVFP4FakeQuantize
from triton_qat.quantizers.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    PerGroupMinMaxObserver,
)
from triton_qat.quantizers.per_token import (
    DynamicPerTokenFakeQuantize,
    fake_quantize_per_token,
    fake_quantize_per_token_spec,
    per_token_qparams,
)

__all__ = [
    "DynamicPerTokenFakeQuantize",
    "FakeQuantize",
    "FakeQuantizeBase",
    "Float8FakeQuantize",
    "FusedMovingAvgObsFakeQuantize",
    "LearnableFakeQuantize",
    "MXFakeQuantize",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "NVFP4FakeQuantize",
    "ObserverBase",
    "PerChannelMinMaxObserver",
    "PerGroupMinMaxObserver",
    "fake_quantize_per_token",
    "fake_quantize_per_token_spec",
    "per_token_qparams",
]
