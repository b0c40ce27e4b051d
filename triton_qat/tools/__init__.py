"""Layer 8, tools: `python -m triton_qat check` (every kernel against the reference),
autotune runs and a model's GEMM shapes, and the command line itself."""
