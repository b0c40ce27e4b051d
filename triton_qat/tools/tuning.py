"""What to autotune: the fused GEMM shapes a model runs, and loading a model factory.

The cache the autotuners consult lives in triton_qat.kernels.autotune_cache.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from triton_qat.nn import Linear
from triton_qat.ops import use_backend


@dataclass(frozen=True)
class LinearShape:
    """One fused GEMM problem: x (m, k) times weight (n, k)^T, the weight's fake-quant
    granularity ("per_tensor", "per_channel", "per_group"; group_size for the last), the
    activation dtype, and whether the input is fake-quantized (per tensor) too."""

    m: int
    n: int
    k: int
    granularity: str
    dtype: torch.dtype
    group_size: int | None = None
    input_fq: bool = False

    @property
    def weights(self) -> str:
        return self.granularity + (f"({self.group_size})" if self.group_size else "")


def collect_linear_shapes(
    model: torch.nn.Module, sample: Any, *, batch_tokens: int | None = None
) -> list[LinearShape]:
    """The fused GEMMs `model` runs on `sample`: one forward (no grad, eager backend) with a
    hook on every tq.nn.Linear that records (M, N, K), the weight granularity, the input dtype
    and input fake quant. M is the product of the input's leading dims, or `batch_tokens`.
    Layers whose weight fake quant is off or not fused are left out; duplicates once, in
    order of first use. `sample` is the forward's argument, or a tuple of them."""
    if batch_tokens is not None and (isinstance(batch_tokens, bool) or batch_tokens <= 0):
        raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
    found: dict[LinearShape, None] = {}

    def qparams_of(fq) -> Any:
        qparams = getattr(fq, "qparams", None)
        return qparams() if callable(qparams) else None

    def record(mod: Linear, inputs: tuple, output: Any) -> None:
        x = inputs[0]
        w_qp = qparams_of(mod.weight_fake_quant)
        if w_qp is None or (w_qp.granularity == "per_channel" and w_qp.axis not in (0, -2)):
            return  # runs F.linear, not a fused GEMM
        x_qp = qparams_of(getattr(mod, "input_fake_quant", None))
        m = batch_tokens if batch_tokens is not None else x.numel() // max(x.shape[-1], 1)
        shape = LinearShape(
            m=int(m),
            n=mod.out_features,
            k=mod.in_features,
            granularity=w_qp.granularity,
            dtype=x.dtype,
            group_size=w_qp.group_size,
            input_fq=x_qp is not None and x_qp.granularity == "per_tensor",
        )
        found.setdefault(shape, None)

    layers = [mod for mod in model.modules() if isinstance(mod, Linear)]
    handles = [mod.register_forward_hook(record) for mod in layers]
    if not handles:
        raise ValueError("model has no triton_qat.nn.Linear layers (run tq.prepare_qat first)")
    try:
        with torch.no_grad(), use_backend("eager"):
            model(*sample) if isinstance(sample, tuple) else model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return list(found)


def load_model(spec: str) -> tuple[torch.nn.Module, Any]:
    """`module:factory` -> factory(), which returns (model, sample batch)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must be module:factory, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--model {spec}: {type(e).__name__}: {e}") from None
    built = factory()
    if not (isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module)):
        raise TypeError(f"--model {spec}: the factory must return (model, sample batch)")
    return built
