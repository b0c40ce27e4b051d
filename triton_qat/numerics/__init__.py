"""Layer 1, numerics: what every other layer builds on, in plain torch.

qparams.py: QParams and every argument check, the normalised (rows, cols) views the kernels
take; reference.py: the eager oracle (NUMERICS.md); observer_formulas.py: torch.ao's
quantization ranges and observer qparams formulas. Imports torch only.
"""
