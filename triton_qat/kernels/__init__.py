"""Triton kernels and their thin launchers. Importing this package imports Triton.

Layer 2. Kernels receive normalized arguments (see triton_qat.numerics.qparams); no autograd,
no modules here.
"""

import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


# Triton decides between compiled and interpreted kernels when @triton.jit runs, reading
# TRITON_INTERPRET then; ask Triton what it decided rather than parsing the variable again.
INTERPRETED_KERNELS: bool = _is_interpreted(_probe)

# Triton's own library (tl.cdiv, ...) was decorated when triton was first imported; if the
# variable changed in between, the two kinds cannot be mixed.
INTERPRETER_MISMATCH: str | None = None
if _is_interpreted(tl.cdiv) != INTERPRETED_KERNELS:
    INTERPRETER_MISMATCH = (
        "TRITON_INTERPRET changed between importing triton and loading triton_qat's kernels; "
        "set it before triton is first imported"
    )
