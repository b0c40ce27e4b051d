"""`python -m triton_qat check`: every kernel against the eager reference, and the reference
against torch, over a grid of qconfigs x shapes x dtypes.

Kinds of rows (`CheckResult`), one per (case, metric):

- ``fake_quant``: the Triton fake-quant kernels (backend "triton") against the eager
  reference (backend "eager"), forward ``y`` and input gradient ``dx``, bit for bit (NaN
  matches NaN). Per tensor, per channel (axis 0 and the last axis), per group (32, 128 and an
  odd divisor); fp32 / fp16 / bf16; int8 / uint8 / int4 ranges; integer and float zero
  points. Inputs mix exact ties (x / scale = k + 0.5), their neighbours one ulp away, values
  at and beyond both clamp edges, random values, and NaN / +-inf / +-0 / 1e30.
- ``reference_vs_torch``: numerics.reference against torch.fake_quantize_per_tensor_affine
  / per_channel_affine on the CPU (per group against the per-channel op on the (-1, group)
  view), integer zero points, finite moderate inputs, forward and gradient, bit for bit.
- ``observer``: the observe kernels (backend "triton") against the eager observer code
  (backend "eager"): FakeQuantize with a (moving-average) min/max observer per tensor, per
  channel along the first and the last axis and per group, and FusedMovingAvgObsFakeQuantize
  per tensor and per channel; symmetric and affine, int8 / uint8 / int4 ranges, three
  observation steps (one with NaN and +-inf for the unfused modules), running ``min`` / ``max``,
  ``scale`` and zero point (``zp``) bit for bit.
- ``fq_linear``: tq.fq_linear on the Triton kernels against the eager composition, outputs
  ``y`` and gradients ``dx``, ``dw``, ``db``. The pass criterion is the relative error norm
  ``||tq - ref64|| / ||ref64||`` against a float64 product of the same fake-quantized
  operands: at most the dtype's unit roundoff (2**-8 bf16, 2**-11 fp16; products of two
  half-precision values are exact in fp32, so the kernel differs from ref64 by its fp32
  accumulation, ~K * 2**-24, and one rounding to the dtype, <= u per element), and 1e-5 for
  fp32 (TF32 off for the whole check). The row also reports the max abs difference and the
  SQNR of the kernels against the eager composition. Inputs are fake-quantized per tensor,
  not at all, or dynamically per token (the w8a8_dynamic / w4a8_dynamic recipes, each row's
  qparams from the Triton per-row pass; ref64 takes them from the eager formula).

- ``learnable``: the learnable (LSQ) ops on the Triton kernels against the eager reference,
  per tensor and per channel (axis 0 and the last axis), fp32 / bf16, float zero points on
  and off halves: ``y`` and ``dx`` bit for bit; ``dscale`` and ``dzp`` (sums of per-element
  terms that the kernels add up in another order) pass when, per channel,
  ``|got - exact| / sum|terms|`` is at most ``(n - 1) * 2**-24``, the error bound of any
  fp32 summation order of n terms, against the float64 sum of the reference's terms.
- ``float_formats``: the float-format kernels (where Triton has float8: compute capability
  8.9 and up, and the interpreter; elsewhere "not run" rows). Fake quant ``y`` bit for bit
  against the reference: FP8 e4m3fn per tensor / per row, e5m2 per row, MXFP8 / MXFP4
  blocks of 32, NVFP4 blocks of 16, fp32 / fp16 / bf16, inputs with a zero row, a row of
  large values and signed zeros. The fused linears (tq.fp8_linear: e4m3fn weights per row,
  inputs per token or float; tq.mx_linear: MXFP8, MXFP4, NVFP4 both operands, NVFP4
  weight-only) against their eager composition, ``y``, ``dx``, ``dw``, ``db``, with the
  ``fq_linear`` criterion (the FP8 tensor-core forward skips the rounding of the operands to
  the dtype, well within it).

Sizes (`grid_size`): --quick uses tiny odd shapes (seconds under the interpreter); the full
grid uses real sizes on CUDA (fake quant 4096x4096, linear M = 1000..8192 with N, K ~ 4096)
and medium ones on the CPU, where the interpreter would take hours at real sizes.

On CUDA every fused GEMM runs one config of its autotune list (the one with the smallest
shared-memory footprint) so that the grid compiles each kernel variant once, not once per
config; `python -m triton_qat autotune` exercises the autotuner. Under the interpreter the
list has one config anyway.
"""

from triton_qat.tools.check.common import (
    KINDS,
    LINEAR_TOLERANCE,
    CheckResult,
    count_bit_mismatches,
    exit_code,
    prepare_device,
)
from triton_qat.tools.check.fake_quant import learnable_grads, summation_error
from triton_qat.tools.check.run import format_row, format_table, grid_size, run_check, table_header

__all__ = [
    "KINDS",
    "LINEAR_TOLERANCE",
    "CheckResult",
    "count_bit_mismatches",
    "exit_code",
    "format_row",
    "format_table",
    "grid_size",
    "learnable_grads",
    "prepare_device",
    "run_check",
    "summation_error",
    "table_header",
]
