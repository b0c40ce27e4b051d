"""Layer 7, model flow: prepare_qat (which modules get which qconfig), convert (integer
weights, QuantizedLinear), and the reload / export of converted models."""
