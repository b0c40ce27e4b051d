"""Triton kernels and their thin launchers. Importing this package imports Triton.

Kernels receive normalized arguments (see triton_qat.qparams); no autograd, no modules here.
"""

from triton_qat._backend import interpreter_enabled

# Triton picks compiled or interpreted kernels when @triton.jit runs, i.e. at this import.
COMPILED_AS_INTERPRETED = interpreter_enabled()
