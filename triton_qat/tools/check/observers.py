"""Checks of the observers' kernels against their eager code."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

import triton_qat as tq
from triton_qat import quantizers as fq
from triton_qat.tools.check.common import (
    DTYPE_NAMES,
    DTYPES,
    QUANT_RANGES,
    CheckResult,
    _bit_exact_row,
    _gen,
)

# --- observer cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ObserverCase:
    """One fake-quant module, observed over a few steps with the kernels and with the eager code."""

    module: str  # "FakeQuantize" or "FusedMovingAvgObsFakeQuantize"
    observer: str  # the observer class name in triton_qat.quantizers
    symmetric: bool
    qrange: tuple[str, int, int]
    shape: tuple[int, ...]
    dtype: torch.dtype
    ch_axis: int | None = None
    group_size: int | None = None

    @property
    def label(self) -> str:
        where = ""
        if self.ch_axis is not None:
            where = f"(axis={self.ch_axis})"
        elif self.group_size is not None:
            where = f"({self.group_size})"
        scheme = "sym" if self.symmetric else "affine"
        fused = "fused " if self.module != "FakeQuantize" else ""
        observer = self.observer.replace("Observer", "").replace("MovingAverage", "MovingAvg")
        return f"{fused}{observer}{where} {scheme} {self.qrange[0]}"

    def build(self) -> torch.nn.Module:

        _, qmin, qmax = self.qrange
        per_tensor = self.ch_axis is None and self.group_size is None
        if self.symmetric:
            qscheme = torch.per_tensor_symmetric if per_tensor else torch.per_channel_symmetric
        else:
            qscheme = torch.per_tensor_affine if per_tensor else torch.per_channel_affine
        kwargs: dict = {
            "quant_min": qmin,
            "quant_max": qmax,
            "dtype": torch.qint8 if qmin < 0 else torch.quint8,
            "qscheme": qscheme,
        }
        if self.ch_axis is not None:
            kwargs["ch_axis"] = self.ch_axis
        if self.group_size is not None:
            kwargs["group_size"] = self.group_size
        module = getattr(fq, self.module)
        return module(observer=getattr(fq, self.observer), **kwargs)


_OBSERVER_METRICS = ("min", "max", "scale", "zp")


def observer_cases(size: str) -> list[ObserverCase]:
    """Observers x granularities x schemes, dtypes and ranges spread over the cases."""
    if size == "tiny":
        t_shape, c_shape, g_shape = (37, 67), (5, 7, 33), (9, 96)
    elif size == "medium":
        t_shape, c_shape, g_shape = (255, 257), (9, 31, 129), (129, 256)
    else:
        t_shape = c_shape = g_shape = (4096, 4096)
    layouts = [
        ("FakeQuantize", "MinMaxObserver", t_shape, None, None),
        ("FakeQuantize", "MovingAverageMinMaxObserver", t_shape, None, None),
        ("FakeQuantize", "PerChannelMinMaxObserver", c_shape, 0, None),
        ("FakeQuantize", "MovingAveragePerChannelMinMaxObserver", c_shape, -1, None),
        ("FakeQuantize", "PerGroupMinMaxObserver", g_shape, None, 32),
        ("FusedMovingAvgObsFakeQuantize", "MovingAverageMinMaxObserver", t_shape, None, None),
        (
            "FusedMovingAvgObsFakeQuantize",
            "MovingAveragePerChannelMinMaxObserver",
            c_shape,
            0,
            None,
        ),
    ]
    cases = []
    for i, (module, observer, shape, axis, group) in enumerate(layouts):
        for j, dtype in enumerate(DTYPES):
            qrange = QUANT_RANGES[(i + j) % len(QUANT_RANGES)]
            cases.append(
                ObserverCase(module, observer, (i + j) % 2 == 0, qrange, shape, dtype, axis, group)
            )
    return cases


def _observer_steps(case: ObserverCase, device: str, seed: int) -> list[Tensor]:
    gen = _gen(device, seed)
    steps = []
    for k in range(3):
        x = torch.randn(case.shape, generator=gen, device=device) * (4.0**k) + (k - 1)
        # The fused formula turns an infinite statistic into a NaN zero point (as torch's op),
        # which fake quant then rejects: specials for the unfused modules only.
        if k == 2 and case.module == "FakeQuantize":
            flat = x.view(-1)
            flat[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
        steps.append(x.to(case.dtype))
    return steps


def check_observer(case: ObserverCase, device: str, seed: int = 0) -> list[CheckResult]:
    """Observe the same inputs with the kernels and with the eager code: min / max and the
    qparams after the last step, bit for bit."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's reduce_range deprecation and the like
        kernel_fq = case.build().to(device)
    eager_fq = copy.deepcopy(kernel_fq)
    steps = _observer_steps(case, device, seed)
    for module, backend in ((kernel_fq, "triton"), (eager_fq, "eager")):
        with tq.use_backend(backend):
            for x in steps:
                module.observe(x)
    values = []
    for module in (kernel_fq, eager_fq):
        observer = module.activation_post_process
        values.append((observer.min_val, observer.max_val, module.scale, module.zero_point))
    dtype = DTYPE_NAMES[case.dtype]
    return [
        _bit_exact_row("observer", case.label, case.shape, dtype, metric, actual, expected)
        for metric, actual, expected in zip(_OBSERVER_METRICS, *values, strict=True)
    ]
