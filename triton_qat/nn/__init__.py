"""QAT modules: drop-ins for torch.ao.nn.qat that run triton_qat's fused kernels."""

from triton_qat.nn.embedding import Embedding
from triton_qat.nn.linear import Linear

__all__ = ["Embedding", "Linear"]
