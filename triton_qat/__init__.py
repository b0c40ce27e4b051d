"""triton_qat: quantization-aware training for PyTorch with Triton kernels.

Fake quantization per tensor, per channel and per group, bit-exact with PyTorch's ops,
fused into the matmul of a QAT Linear (tq.nn.Linear, a drop-in for torch.ao.nn.qat.Linear),
running as Triton kernels on CUDA (or interpreted on the CPU with TRITON_INTERPRET=1) and as
an eager PyTorch reference everywhere else. Importing this package never touches CUDA.
"""

from triton_qat import nn
from triton_qat.flow.convert import convert
from triton_qat.flow.export import export_compressed_tensors
from triton_qat.flow.prepare import QATSummary, prepare_qat, qat_summary
from triton_qat.flow.serialize import load_converted, save_converted
from triton_qat.numerics.qparams import PerTokenQParams, QParams
from triton_qat.ops import (
    fake_quantize_per_channel,
    fake_quantize_per_group,
    fake_quantize_per_tensor,
    fp8_linear,
    fq_linear,
    get_backend,
    mx_linear,
    set_backend,
    use_backend,
)
from triton_qat.qconfig import QConfig, get_qconfig, list_qconfigs, register_qconfig

__version__ = "0.1.0"

__all__ = [
    "PerTokenQParams",
    "QATSummary",
    "QConfig",
    "QParams",
    "__version__",
    "convert",
    "export_compressed_tensors",
    "fake_quantize_per_channel",
    "fake_quantize_per_group",
    "fake_quantize_per_tensor",
    "fp8_linear",
    "fq_linear",
    "get_backend",
    "get_qconfig",
    "list_qconfigs",
    "load_converted",
    "mx_linear",
    "nn",
    "prepare_qat",
    "qat_summary",
    "register_qconfig",
    "save_converted",
    "set_backend",
    "use_backend",
]
