"""Observer and fake-quantize modules, drop-ins for torch.ao.quantization's.

The observers (MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver,
MovingAveragePerChannelMinMaxObserver) take the same arguments, hold the same buffers and
state_dict entries, and compute the same scale and zero point, bit for bit, as torch.ao's
classes of the same name. PerGroupMinMaxObserver adds per-group statistics (groups of
`group_size` consecutive elements along the last dim).

FakeQuantize and FusedMovingAvgObsFakeQuantize reproduce torch.ao's modules (buffers,
state_dict keys, observer updates, numerics of torch.fused_moving_average_obs_fake_quant),
but fake-quantize through triton_qat.ops, so they run the Triton kernels on the GPU. Both
expose `observe(x)` (the statistics half of forward) and `qparams()` (the current scale and
zero point as a QParams) for the fused linear.

Where the Triton path runs (triton_qat._backend.use_triton: CUDA, or the CPU under
TRITON_INTERPRET=1), the observers' statistics, running updates and qparams come from
triton_qat.kernels.observe, which mirrors the eager code below bit for bit (two launches, no
host sync); the eager code runs elsewhere, and for non-float inputs, non-fp32 statistics
buffers and ranges beyond +-2**20.

Differences from torch.ao, all deliberate:
- Every scale and zero point is computed with torch's CPU formula on every device: torch on
  CUDA multiplies by the reciprocal where its CPU kernels divide by a Python number, and its
  fused CUDA kernel has its own qparam code (NUMERICS.md: the small-scale cutoff is CPU only).
  Here divisions are true divisions everywhere.
- Inputs of any float dtype (fp16 and bf16 included) work: statistics are taken in fp32 and
  the output keeps the input dtype (torch's fused CPU op refuses bf16).
- FakeQuantize derives its qparams from the observer without calculate_qparams()'s host
  synchronisations (validity check, float() of 0-dim results); calculate_qparams() itself
  keeps torch.ao's checks and warnings.
- Bad arguments raise ValueError / NotImplementedError where torch.ao asserts.
- Per-channel fake quant takes a negative ch_axis, and FusedMovingAvgObsFakeQuantize any
  ch_axis (torch's ops raise for both).
- per_channel_affine_float_qparams is not supported.

torch.ao is optional: without it the base classes are plain nn.Modules with the same buffers
and methods.
"""

from __future__ import annotations

import functools
import warnings
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from triton_qat._backend import use_triton
from triton_qat.ops import (
    fake_quantize_learnable,
    fake_quantize_learnable_per_channel,
    fake_quantize_per_channel,
    fake_quantize_per_group,
    fake_quantize_per_tensor,
)
from triton_qat.qparams import FLOAT_DTYPES, QUANT_LIMIT, PerTokenQParams, QParams
from triton_qat.reference import divide_fp32 as _div
from triton_qat.reference import minmax_qparams, per_token_qparams_ref

try:  # torch.ao is optional: the package works without it
    import torch.ao.quantization.fake_quantize as _ao_fake_quantize
    import torch.ao.quantization.observer as _ao_observer
except Exception:  # an ImportError, or a broken install raising anything
    _ao_fake_quantize = None
    _ao_observer = None

__all__ = [
    "FakeQuantize",
    "FakeQuantizeBase",
    "FusedMovingAvgObsFakeQuantize",
    "LearnableFakeQuantize",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "ObserverBase",
    "PerChannelMinMaxObserver",
    "PerGroupMinMaxObserver",
]

_FP32_EPS = torch.finfo(torch.float32).eps
# torch's ChooseQuantizationParams (CPU) raises smaller scales to this (2**-14, fp16's limit).
_SMALL_SCALE_THRESHOLD = float(torch.tensor(6.1e-5, dtype=torch.float32))

_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
_ALLOWED_DTYPES = (
    torch.qint8,
    torch.quint8,
    torch.quint4x2,
    torch.qint32,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
    torch.uint16,
)
# torch.iinfo does not know every quantized dtype (quint4x2 raises).
_DTYPE_RANGE = {
    torch.quint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.quint4x2: (0, 15),
    torch.quint2x4: (0, 3),
    torch.qint32: (-(2**31), 2**31 - 1),
}


# --- factories (with_args) ---------------------------------------------------------------------


class _PartialWrapperFallback:
    """torch.ao.quantization.observer._PartialWrapper, for when torch.ao is missing."""

    def __init__(self, p: functools.partial) -> None:
        self.p = p
        self.callable_args: dict[str, Any] = {}

    def __call__(self, *args: Any, **keywords: Any) -> Any:
        for name, make in self.callable_args.items():
            if name not in keywords:
                keywords = {**keywords, name: make()}
        return self.p(*args, **keywords)

    def __repr__(self) -> str:
        return self.p.__repr__() + self.callable_args.__repr__()

    def with_args(self, **kwargs: Any) -> _PartialWrapperFallback:
        return _with_args(self, **kwargs)

    def with_callable_args(self, **kwargs: Any) -> _PartialWrapperFallback:
        result = _PartialWrapperFallback(self.p)
        result.callable_args = {**self.callable_args, **kwargs}
        return result


def _with_args(cls_or_self: Any, **kwargs: Any) -> Any:
    """A factory building `cls_or_self(**kwargs)`; torch.ao's own wrapper when available, so
    torch.ao's qconfig helpers (equality, dtype lookup through `.p.keywords`) accept it."""
    ao_with_args = getattr(_ao_observer, "_with_args", None)
    if ao_with_args is not None:
        return ao_with_args(cls_or_self, **kwargs)
    return _PartialWrapperFallback(functools.partial(cls_or_self, **kwargs))


def _with_callable_args(cls_or_self: Any, **kwargs: Any) -> Any:
    ao_fn = getattr(_ao_observer, "_with_callable_args", None)
    if ao_fn is not None:
        return ao_fn(cls_or_self, **kwargs)
    return _PartialWrapperFallback(functools.partial(cls_or_self)).with_callable_args(**kwargs)


# --- base classes --------------------------------------------------------------------------


if _ao_observer is not None and hasattr(_ao_observer, "ObserverBase"):
    _ObserverRoot: type = _ao_observer.ObserverBase
else:

    class _ObserverRoot(ABC, nn.Module):  # type: ignore[no-redef]
        """torch.ao.quantization.ObserverBase's interface, without torch.ao."""

        def __init__(self, dtype: torch.dtype, is_dynamic: bool = False) -> None:
            super().__init__()
            self.dtype = dtype
            self.is_dynamic = is_dynamic

        @abstractmethod
        def forward(self, x):
            pass

        @abstractmethod
        def calculate_qparams(self, **kwargs):
            pass


class ObserverBase(_ObserverRoot):
    """Base of triton_qat's observers: torch.ao's ObserverBase when torch.ao is installed."""

    with_args = classmethod(_with_args)
    with_callable_args = classmethod(_with_callable_args)


if _ao_fake_quantize is not None and hasattr(_ao_fake_quantize, "FakeQuantizeBase"):
    _FakeQuantizeRoot: type = _ao_fake_quantize.FakeQuantizeBase
else:

    class _FakeQuantizeRoot(ABC, nn.Module):  # type: ignore[no-redef]
        """torch.ao.quantization.FakeQuantizeBase's interface, without torch.ao."""

        fake_quant_enabled: Tensor
        observer_enabled: Tensor

        def __init__(self) -> None:
            super().__init__()
            # uint8 buffers, as torch.ao (DDP replicates buffers; NCCL has no bool).
            self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
            self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))

        @abstractmethod
        def forward(self, x):
            pass

        @abstractmethod
        def calculate_qparams(self, **kwargs):
            pass

        def enable_fake_quant(self, enabled: bool = True) -> None:
            self.fake_quant_enabled[0] = 1 if enabled else 0

        def disable_fake_quant(self) -> None:
            self.enable_fake_quant(False)

        def enable_observer(self, enabled: bool = True) -> None:
            self.observer_enabled[0] = 1 if enabled else 0

        def disable_observer(self) -> None:
            self.enable_observer(False)


class FakeQuantizeBase(_FakeQuantizeRoot):
    """Base of triton_qat's fake-quantize modules: a subclass of
    torch.ao.quantization.FakeQuantizeBase when torch.ao is installed, so torch.ao's
    enable/disable_observer and enable/disable_fake_quant helpers act on it."""

    @classmethod
    def with_args(cls, **kwargs: Any) -> Any:
        """A factory: `FakeQuantize.with_args(...)()` builds the module; chainable."""
        return _with_args(cls, **kwargs)


# --- quantization ranges ---------------------------------------------------------------------


def _dtype_range(dtype: torch.dtype) -> tuple[int, int]:
    if dtype in _DTYPE_RANGE:
        return _DTYPE_RANGE[dtype]
    info = torch.iinfo(dtype)
    return int(info.min), int(info.max)


def _validate_custom_qrange(quant_min: int, quant_max: int) -> None:
    if not quant_min <= 0 <= quant_max:
        raise ValueError(
            f"the quantization range [quant_min, quant_max] must include 0, "
            f"got [{quant_min}, {quant_max}]"
        )
    if quant_min >= quant_max:
        raise ValueError(
            f"quant_min must be strictly less than quant_max, got {quant_min} >= {quant_max}"
        )


def _quant_range(
    quant_min: int | None,
    quant_max: int | None,
    dtype: torch.dtype,
    reduce_range: bool,
) -> tuple[int, int, bool]:
    """(quant_min, quant_max, has_customized_qrange), as torch.ao's calculate_qmin_qmax."""
    custom = quant_min is not None and quant_max is not None
    if custom:
        assert quant_min is not None and quant_max is not None
        _validate_custom_qrange(quant_min, quant_max)
        length = quant_max - quant_min + 1
        if dtype in (torch.qint8, torch.int8) and not 0 < length <= 256:
            raise ValueError(
                f"quant_max - quant_min + 1 must be within (0, 256] for {dtype}, got {length}"
            )
        if dtype in (torch.qint32, torch.int32) and not 0 < length <= 2**32:
            raise ValueError(
                f"quant_max - quant_min + 1 must be within (0, 2**32] for {dtype}, got {length}"
            )
        if reduce_range:
            quant_min, quant_max = quant_min // 2, quant_max // 2
        return quant_min, quant_max, True
    if dtype in (torch.qint8, torch.int8):
        lo, hi = (-64, 63) if reduce_range else (-128, 127)
    elif dtype in (torch.quint8, torch.uint8):
        lo, hi = (0, 127) if reduce_range else (0, 255)
    elif dtype in (torch.qint32, torch.int32):
        lo, hi = -(2**31), 2**31 - 1
    elif dtype == torch.uint16:
        lo, hi = 0, 2**16 - 1
    elif dtype == torch.int16:
        lo, hi = -(2**15), 2**15 - 1
    else:
        lo, hi = 0, 15
    return lo, hi, False


# --- qparams formulas (NUMERICS.md, "Observers") ---------------------------------------------


def _minmax_qparams(
    min_val: Tensor,
    max_val: Tensor,
    quant_min: int,
    quant_max: int,
    qscheme: torch.qscheme,
    dtype: torch.dtype,
    has_customized_qrange: bool,
    eps: Tensor,
) -> tuple[Tensor, Tensor]:
    """torch.ao's UniformQuantizationObserverBase._calculate_qparams, after its validity check
    (the formula: reference.minmax_qparams)."""
    symmetric = qscheme in _SYMMETRIC
    zp = _symmetric_zero_point(quant_min, quant_max, dtype, has_customized_qrange)
    return minmax_qparams(min_val, max_val, quant_min, quant_max, symmetric, zp, eps)


def _symmetric_zero_point(
    quant_min: int, quant_max: int, dtype: torch.dtype, has_customized_qrange: bool
) -> int:
    """The fixed zero point of torch.ao's symmetric schemes for `dtype`."""
    if dtype in (torch.quint8, torch.uint8):
        return (quant_min + quant_max) // 2 if has_customized_qrange else 128
    if dtype == torch.uint16:
        return 2**15
    return 0


def _fused_qparams(
    min_val: Tensor, max_val: Tensor, quant_min: int, quant_max: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """torch.fused_moving_avg_obs_fake_quant's qparams (ChooseQuantizationParams, CPU), elementwise.

    fp32 min/max in, fp32 scale and int32 zero point out, same shape. Each step rounds where
    the C++ does: float arithmetic as fp32, double as fp64. Found bit-exact with torch 2.13's
    CPU op (tests/test_fake_quantize.py) only with these two details: the scale is rounded to
    fp32 before the zero point is derived from it, and the zero point comes from the min when
    |qmin| + |min / scale| < |qmax| + |max / scale| (sums of magnitudes), else from the max."""
    f32, f64 = torch.float32, torch.float64
    mn = min_val.to(f32)
    mx = max_val.to(f32)
    qrange = quant_max - quant_min
    if symmetric:
        # preserve_sparsity: widen [min, max] to the symmetric range around 0.
        sym_min, sym_max = -(qrange // 2 + 1), qrange // 2
        straddles = (mn < 0) & (mx > 0)
        max_scale = torch.max(_div(mn, float(sym_min)).abs(), _div(mx, float(sym_max)).abs())
        max_scale = max_scale.to(f64)
        mn = torch.where(straddles, (max_scale * sym_min).to(f32), mn)
        mx = torch.where(straddles, (max_scale * sym_max).to(f32), mx)
    mn = torch.clamp(mn, max=0.0)
    mx = torch.clamp(mx, min=0.0)
    scale = _div(mx.to(f64) - mn.to(f64), float(qrange)).to(f32)
    # 0 or an infinite reciprocal: 0.1, as fbgemm precomputes 1 / scale.
    degenerate = (scale == 0) | torch.isinf(torch.ones_like(scale) / scale)
    scale = torch.where(degenerate, torch.full_like(scale, 0.1), scale)
    small = scale < _SMALL_SCALE_THRESHOLD
    amplifier = torch.full_like(scale, _SMALL_SCALE_THRESHOLD) / scale
    cut_max = torch.full_like(mx, _SMALL_SCALE_THRESHOLD) * float(qrange)
    small_mn = torch.where(mx == 0, -cut_max, mn * amplifier)
    small_mx = torch.where(mx == 0, mx, mx * amplifier)
    small_mn = torch.where(mn == 0, mn, small_mn)
    small_mx = torch.where(mn == 0, cut_max, small_mx)
    mn = torch.where(small, small_mn, mn)
    mx = torch.where(small, small_mx, mx)
    scale = torch.where(small, torch.full_like(scale, _SMALL_SCALE_THRESHOLD), scale)
    # Zero point from the min or the max, whichever adds the smaller terms.
    scale64 = scale.to(f64)
    rmin = mn.to(f64) / scale64
    rmax = mx.to(f64) / scale64
    from_min_error = abs(quant_min) + rmin.abs()
    from_max_error = abs(quant_max) + rmax.abs()
    initial = torch.where(from_min_error < from_max_error, quant_min - rmin, quant_max - rmax)
    if symmetric:
        mid = torch.full_like(initial, (quant_min + quant_max) / 2)
        initial = torch.where((mn < 0) & (mx > 0), mid, initial)
    nudged = torch.round(initial).clamp(quant_min, quant_max)
    return scale, nudged.to(torch.int32)


def _check_min_max_valid(min_val: Tensor, max_val: Tensor) -> bool:
    """torch.ao.quantization.utils.check_min_max_valid (warnings and checks alike)."""
    msg = "must run observer before calling calculate_qparams. Returning default values."
    if min_val.numel() == 0 or max_val.numel() == 0:
        warnings.warn(msg, stacklevel=3)
        return False
    if min_val.dim() == 0 or max_val.dim() == 0:
        if min_val == float("inf") and max_val == float("-inf"):
            warnings.warn(msg, stacklevel=3)
            return False
        if min_val > max_val:
            raise ValueError(f"min {min_val} should be less than max {max_val}")
    elif torch.any(min_val > max_val):
        raise ValueError(f"min {min_val} should be less than max {max_val}")
    return True


# --- observers -------------------------------------------------------------------------------


def _aminmax(x: Tensor, dtype: torch.dtype, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """torch.aminmax(x.to(dtype)) without the converted copy of x: min and max commute with
    the (monotonic) conversion, so a float x is reduced in its own dtype and the results cast."""
    if not x.is_floating_point():
        x = x.to(dtype)
    min_val, max_val = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    return min_val.to(dtype), max_val.to(dtype)


def _kernel_range(quant_min: int, quant_max: int) -> bool:
    """Whether the observe kernels take this range: they carry it in fp32, exact within +-2**20
    (wider ranges, e.g. qint32's, run the eager code)."""
    return abs(quant_min) <= QUANT_LIMIT and abs(quant_max) <= QUANT_LIMIT


def _observe_kernels(x: Tensor, *buffers: Tensor) -> Any:
    """triton_qat.kernels.observe when it runs for x: a non-empty float x on a device where the
    Triton path runs (use_triton), contiguous fp32 statistics buffers on x's device; else None
    (the eager code runs)."""
    if x.numel() == 0 or x.dtype not in FLOAT_DTYPES:
        return None
    for b in buffers:
        if b.dtype != torch.float32 or b.device != x.device or not b.is_contiguous():
            return None
    if not use_triton(x.device):
        return None
    from triton_qat.kernels import observe

    return observe


class _UniformObserver(ObserverBase):
    """torch.ao's UniformQuantizationObserverBase: qscheme, dtype, range, eps."""

    # torch.ao's observer state_dict version (3: per-channel buffers named min_val / max_val).
    _version = 3

    eps: Tensor

    def __init__(
        self,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        factory_kwargs: dict | None = None,
        eps: float = _FP32_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        factory_kwargs = torch.nn.factory_kwargs(factory_kwargs)
        super().__init__(dtype=dtype, is_dynamic=is_dynamic, **kwargs)
        self.qscheme = qscheme
        if reduce_range:
            warnings.warn(
                "Please use quant_min and quant_max to specify the range for observers. "
                "reduce_range will be deprecated in a future release of PyTorch.",
                stacklevel=2,
            )
        self.reduce_range = reduce_range
        self.register_buffer("eps", torch.tensor([eps], **factory_kwargs))
        if qscheme == torch.per_channel_affine_float_qparams:
            raise NotImplementedError(
                "triton_qat observers do not support torch.per_channel_affine_float_qparams"
            )
        if qscheme not in _PER_TENSOR + _PER_CHANNEL:
            raise ValueError(
                "qscheme must be per_tensor_affine, per_tensor_symmetric, per_channel_affine or "
                f"per_channel_symmetric, got {qscheme}"
            )
        if dtype not in _ALLOWED_DTYPES:
            raise ValueError(f"dtype must be one of {_ALLOWED_DTYPES}, got {dtype}")
        self.quant_min, self.quant_max, self.has_customized_qrange = _quant_range(
            quant_min, quant_max, dtype, reduce_range
        )

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        version = local_metadata.get("version", None)
        if version is None or version == 1:
            # eps became a buffer in version 2.
            state_dict[prefix + "eps"] = torch.tensor([_FP32_EPS])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _qparams_of(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        return _minmax_qparams(
            min_val,
            max_val,
            self.quant_min,
            self.quant_max,
            self.qscheme,
            self.dtype,
            self.has_customized_qrange,
            self.eps,
        )

    def _calculate_qparams(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        """torch.ao's _calculate_qparams: scale fp32 and zero point of shape (1,) per tensor,
        (C,) per channel; (1.0, 0) before the first observation."""
        if not _check_min_max_valid(min_val, max_val):
            device = min_val.device
            return torch.tensor([1.0], device=device), torch.tensor([0], device=device)
        scale, zero_point = self._qparams_of(min_val, max_val)
        return scale.reshape(scale.shape or (1,)), zero_point.reshape(zero_point.shape or (1,))

    def _device_update(self, x: Tensor, kernels: Any) -> dict | None:
        """The observe kernel's layout and update arguments for x, buffers resized to the
        statistics' shape; None where the eager code must run."""
        return None

    def _observe_on_device(self, x: Tensor, with_qparams: bool = False) -> Any:
        """forward(x)'s statistics update with the observe kernels, and with `with_qparams`
        also _qparams_for_fake_quant()'s values from the same launch: True or (scale,
        zero_point); None (nothing done) where the eager code must run."""
        if not _kernel_range(self.quant_min, self.quant_max):
            return None
        kernels = _observe_kernels(x, self.min_val, self.max_val, self.eps)
        if kernels is None or self.eps.numel() != 1:
            return None
        args = self._device_update(x, kernels)
        if args is None:
            return None
        scale = zero_point = None
        if with_qparams:
            n = self.min_val.numel()
            scale = torch.empty(n, dtype=torch.float32, device=x.device)
            zero_point = torch.empty(n, dtype=torch.int32, device=x.device)
            symmetric = self.qscheme in _SYMMETRIC
            args.update(
                qparams=kernels.OBSERVER_QPARAMS,
                scale=scale,
                zero_point=zero_point,
                quant_min=self.quant_min,
                quant_max=self.quant_max,
                symmetric=symmetric,
                zp_symmetric=_symmetric_zero_point(
                    self.quant_min, self.quant_max, self.dtype, self.has_customized_qrange
                ),
                eps=self.eps,
                not_observed_default=self.min_val.dim() == 0,
            )
        kernels.observe(x.detach(), self.min_val, self.max_val, **args)
        if not with_qparams:
            return True
        assert scale is not None and zero_point is not None
        shape = self.min_val.shape or (1,)
        # Zero point dtypes as the eager formula: int64 for symmetric schemes, int32 for affine.
        zp_dtype = torch.int64 if self.qscheme in _SYMMETRIC else torch.int32
        return scale.reshape(shape), zero_point.to(zp_dtype).reshape(shape)

    def _observe_for_fake_quant(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """forward(x), then _qparams_for_fake_quant(): one kernel pass where it runs."""
        on_device = self._observe_on_device(x, with_qparams=True)
        if on_device is not None:
            return on_device
        self(x)
        return self._qparams_for_fake_quant()

    def _qparams_for_fake_quant(self) -> tuple[Tensor, Tensor]:
        """calculate_qparams' values without its host synchronisation (no checks, no warning)."""
        min_val, max_val = self.min_val, self.max_val
        device = min_val.device
        if min_val.numel() == 0 or max_val.numel() == 0:
            return torch.ones(1, device=device), torch.zeros(1, dtype=torch.int64, device=device)
        scale, zero_point = self._qparams_of(min_val, max_val)
        if min_val.dim() == 0 or max_val.dim() == 0:
            observed = ~((min_val == float("inf")) & (max_val == float("-inf")))
            scale = torch.where(observed, scale, torch.ones_like(scale))
            zero_point = torch.where(observed, zero_point, torch.zeros_like(zero_point))
        return scale.reshape(scale.shape or (1,)), zero_point.reshape(zero_point.shape or (1,))

    def reset_min_max_vals(self) -> None:
        raise NotImplementedError("Cannot reset min/max values in the given observer.")

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}"


def _check_not_dynamic(cls_name: str, is_dynamic: bool) -> None:
    if is_dynamic:
        raise NotImplementedError(f"{cls_name} doesn't support dynamic quantization")


class MinMaxObserver(_UniformObserver):
    """Running min and max of the whole tensor (torch.ao.quantization.MinMaxObserver)."""

    min_val: Tensor
    max_val: Tensor

    def __init__(
        self,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        factory_kwargs: dict | None = None,
        eps: float = _FP32_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if qscheme not in _PER_TENSOR:
            raise NotImplementedError(
                f"{type(self).__name__}'s qscheme must be torch.per_tensor_symmetric or "
                f"torch.per_tensor_affine, got {qscheme}"
            )
        super().__init__(
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            factory_kwargs=factory_kwargs,
            eps=eps,
            is_dynamic=is_dynamic,
            **kwargs,
        )
        factory_kwargs = torch.nn.factory_kwargs(factory_kwargs)
        self.register_buffer("min_val", torch.tensor(float("inf"), **factory_kwargs))
        self.register_buffer("max_val", torch.tensor(float("-inf"), **factory_kwargs))
        if qscheme == torch.per_tensor_symmetric and reduce_range and dtype == torch.quint8:
            raise NotImplementedError("Cannot reduce range for symmetric quantization for quint8")

    def forward(self, x_orig: Tensor) -> Tensor:
        """Record the running min and max of x; return x unchanged."""
        if x_orig.numel() == 0 or self._observe_on_device(x_orig):
            return x_orig
        min_cur, max_cur = _aminmax(x_orig.detach(), self.min_val.dtype)
        self.min_val.copy_(torch.min(min_cur, self.min_val))
        self.max_val.copy_(torch.max(max_cur, self.max_val))
        return x_orig

    def _device_update(self, x: Tensor, kernels: Any) -> dict | None:
        if self.min_val.numel() != 1 or self.max_val.numel() != 1:
            return None
        return {"update": kernels.RUNNING_MINMAX}

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(scale, zero_point) from the recorded min and max, as torch.ao."""
        return self._calculate_qparams(self.min_val, self.max_val)

    def reset_min_max_vals(self) -> None:
        """Forget the recorded min and max."""
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Moving average of the min and max (torch.ao.quantization.MovingAverageMinMaxObserver):
    the first observation sets them, then v += averaging_constant * (current - v)."""

    def __init__(
        self,
        averaging_constant: float = 0.01,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        eps: float = _FP32_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if qscheme not in _PER_TENSOR:
            raise NotImplementedError(
                f"MovingAverageMinMaxObserver's qscheme must be torch.per_tensor_symmetric or "
                f"torch.per_tensor_affine, got {qscheme}"
            )
        self.averaging_constant = averaging_constant
        if is_dynamic and averaging_constant != 1:
            raise NotImplementedError(
                "MovingAverageMinMaxObserver doesn't support dynamic quantization for "
                f"averaging constant of {averaging_constant}"
            )
        super().__init__(
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            eps=eps,
            is_dynamic=is_dynamic,
            **kwargs,
        )

    def forward(self, x_orig: Tensor) -> Tensor:
        """Update the moving min and max with x; return x unchanged."""
        if x_orig.numel() == 0 or self._observe_on_device(x_orig):
            return x_orig
        min_val, max_val = self.min_val, self.max_val
        min_cur, max_cur = _aminmax(x_orig.detach(), min_val.dtype)
        # torch.ao tests `min == inf and max == -inf` on the host; a where needs no sync.
        first = (min_val == float("inf")) & (max_val == float("-inf"))
        c = self.averaging_constant
        self.min_val.copy_(torch.where(first, min_cur, min_val + c * (min_cur - min_val)))
        self.max_val.copy_(torch.where(first, max_cur, max_val + c * (max_cur - max_val)))
        return x_orig

    def _device_update(self, x: Tensor, kernels: Any) -> dict | None:
        if self.min_val.numel() != 1 or self.max_val.numel() != 1:
            return None
        return {
            "update": kernels.MOVING_AVERAGE_FIRST,
            "averaging_constant": self.averaging_constant,
        }


class _ResizableMinMax(_UniformObserver):
    """min_val / max_val buffers that start empty and take the statistics' shape."""

    min_val: Tensor
    max_val: Tensor

    def _store(self, min_val: Tensor, max_val: Tensor) -> None:
        self.min_val.resize_(min_val.shape)
        self.max_val.resize_(max_val.shape)
        self.min_val.copy_(min_val)
        self.max_val.copy_(max_val)

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(scale, zero_point) from the recorded min and max, as torch.ao."""
        return self._calculate_qparams(self.min_val, self.max_val)

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        version = local_metadata.get("version")
        # Version < 3 checkpoints name the per-channel buffers min_vals / max_vals.
        names = ("min_vals", "max_vals") if version is not None and version < 3 else None
        local_state = names or ("min_val", "max_val")
        for name, buffer in zip(local_state, (self.min_val, self.max_val), strict=True):
            key = prefix + name
            if key in state_dict:
                # Buffers start empty: take the saved shape, the values are copied below.
                buffer.resize_(state_dict[key].shape)
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, False, missing_keys, unexpected_keys, error_msgs
        )

    def reset_min_max_vals(self) -> None:
        """Forget the recorded min and max (back to empty buffers)."""
        self.min_val = self.min_val.new_empty(0)
        self.max_val = self.max_val.new_empty(0)


def _channel_rows(x: Tensor, ch_axis: int) -> Tensor:
    """x with ch_axis swapped to the front and flattened to (channels, -1), as torch.ao."""
    axes = list(range(x.dim()))
    axes[ch_axis] = 0
    axes[0] = ch_axis
    return torch.flatten(x.permute(axes), start_dim=1)


class PerChannelMinMaxObserver(_ResizableMinMax):
    """Running min and max per channel along ch_axis
    (torch.ao.quantization.PerChannelMinMaxObserver)."""

    def __init__(
        self,
        ch_axis: int = 0,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_channel_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        factory_kwargs: dict | None = None,
        eps: float = _FP32_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if qscheme not in _PER_CHANNEL and qscheme != torch.per_channel_affine_float_qparams:
            raise NotImplementedError(
                f"{type(self).__name__}'s qscheme must be torch.per_channel_symmetric or "
                f"torch.per_channel_affine, got {qscheme}"
            )
        _check_not_dynamic(type(self).__name__, is_dynamic)
        super().__init__(
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            factory_kwargs=factory_kwargs,
            eps=eps,
            is_dynamic=is_dynamic,
            **kwargs,
        )
        factory_kwargs = torch.nn.factory_kwargs(factory_kwargs)
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.tensor([], **factory_kwargs))
        self.register_buffer("max_val", torch.tensor([], **factory_kwargs))
        if qscheme == torch.per_channel_symmetric and reduce_range and dtype == torch.quint8:
            raise NotImplementedError("Cannot reduce range for symmetric quantization for quint8")

    def _channel_update(self, x: Tensor, update: int) -> dict | None:
        """Kernel arguments for per-channel statistics: `update` on recorded ones, a plain
        store into resized buffers on the first call."""
        if x.dim() == 0 or not -x.dim() <= self.ch_axis < x.dim():
            return None
        channels = x.size(self.ch_axis)
        if self.min_val.numel() != 0 and self.max_val.numel() != 0:
            if self.min_val.shape != (channels,) or self.max_val.shape != (channels,):
                return None
            return {"axis": self.ch_axis, "update": update}
        self.min_val.resize_(channels)
        self.max_val.resize_(channels)
        return {"axis": self.ch_axis}

    def _device_update(self, x: Tensor, kernels: Any) -> dict | None:
        return self._channel_update(x, kernels.RUNNING_MINMAX)

    def forward(self, x_orig: Tensor) -> Tensor:
        """Record the running per-channel min and max of x; return x unchanged."""
        if x_orig.numel() == 0 or self._observe_on_device(x_orig):
            return x_orig
        y = _channel_rows(x_orig.detach(), self.ch_axis)
        min_cur, max_cur = _aminmax(y, self.min_val.dtype, dim=1)
        if self.min_val.numel() != 0 and self.max_val.numel() != 0:
            min_cur = torch.min(min_cur, self.min_val)
            max_cur = torch.max(max_cur, self.max_val)
        self._store(min_cur, max_cur)
        return x_orig


class MovingAveragePerChannelMinMaxObserver(PerChannelMinMaxObserver):
    """Moving average of the per-channel min and max
    (torch.ao.quantization.MovingAveragePerChannelMinMaxObserver)."""

    def __init__(
        self,
        averaging_constant: float = 0.01,
        ch_axis: int = 0,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_channel_affine,
        reduce_range: bool = False,
        quant_min: int | None = None,
        quant_max: int | None = None,
        eps: float = _FP32_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_not_dynamic(type(self).__name__, is_dynamic)
        super().__init__(
            ch_axis=ch_axis,
            dtype=dtype,
            qscheme=qscheme,
            reduce_range=reduce_range,
            quant_min=quant_min,
            quant_max=quant_max,
            eps=eps,
            is_dynamic=is_dynamic,
            **kwargs,
        )
        self.averaging_constant = averaging_constant

    def _device_update(self, x: Tensor, kernels: Any) -> dict | None:
        args = self._channel_update(x, kernels.MOVING_AVERAGE)
        if args is not None:
            args["averaging_constant"] = self.averaging_constant
        return args

    def forward(self, x_orig: Tensor) -> Tensor:
        """Update the per-channel moving min and max with x; return x unchanged."""
        if x_orig.numel() == 0 or self._observe_on_device(x_orig):
            return x_orig
        y = _channel_rows(x_orig.detach(), self.ch_axis)
        min_cur, max_cur = _aminmax(y, self.min_val.dtype, dim=1)
        if self.min_val.numel() != 0 and self.max_val.numel() != 0:
            c = self.averaging_constant
            min_cur = self.min_val + c * (min_cur - self.min_val)
            max_cur = self.max_val + c * (max_cur - self.max_val)
        self._store(min_cur, max_cur)
        return x_orig


class PerGroupMinMaxObserver(_ResizableMinMax):
    """Min and max of the last observed tensor per group of `group_size` consecutive elements
    along its last dim (no running statistics).

    min_val / max_val (and the qparams) have shape (*x.shape[:-1], x.shape[-1] // group_size);
    scale and zero point follow torch.ao's observer formulas per group (symmetric or affine by
    qscheme); the zero point is int32.
    """

    def __init__(
        self,
        group_size: int,
        dtype: torch.dtype = torch.qint8,
        qscheme: torch.qscheme = torch.per_channel_symmetric,
        quant_min: int | None = None,
        quant_max: int | None = None,
        eps: float = _FP32_EPS,
        is_dynamic: bool = False,
        factory_kwargs: dict | None = None,
    ) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        if qscheme not in _PER_TENSOR + _PER_CHANNEL:
            raise NotImplementedError(
                "PerGroupMinMaxObserver's qscheme must be symmetric or affine "
                f"(torch.per_channel_symmetric, torch.per_channel_affine), got {qscheme}"
            )
        super().__init__(
            dtype=dtype,
            qscheme=qscheme,
            quant_min=quant_min,
            quant_max=quant_max,
            factory_kwargs=factory_kwargs,
            eps=eps,
            is_dynamic=is_dynamic,
        )
        factory_kwargs = torch.nn.factory_kwargs(factory_kwargs)
        self.group_size = group_size
        self.register_buffer("min_val", torch.tensor([], **factory_kwargs))
        self.register_buffer("max_val", torch.tensor([], **factory_kwargs))

    def forward(self, x_orig: Tensor) -> Tensor:
        """Record the per-group min and max of x; return x unchanged."""
        if x_orig.numel() == 0:
            return x_orig
        if x_orig.dim() == 0:
            raise ValueError("PerGroupMinMaxObserver needs an input with at least one dim")
        k, g = x_orig.shape[-1], self.group_size
        if k % g != 0:
            raise ValueError(f"group_size {g} does not divide the last dim of the input ({k})")
        if self._observe_on_device(x_orig):
            return x_orig
        groups = x_orig.detach().reshape(*x_orig.shape[:-1], k // g, g)
        min_cur, max_cur = _aminmax(groups, self.min_val.dtype, dim=-1)
        self._store(min_cur, max_cur)
        return x_orig

    def _device_update(self, x: Tensor, kernels: Any) -> dict | None:
        k, g = x.shape[-1], self.group_size
        if x.dim() == 0 or k % g != 0:
            return None
        shape = (*x.shape[:-1], k // g)
        self.min_val.resize_(shape)
        self.max_val.resize_(shape)
        return {"group_size": g}

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(scale fp32, zero_point int32), shaped (*x.shape[:-1], x.shape[-1] // group_size)."""
        scale, zero_point = self._calculate_qparams(self.min_val, self.max_val)
        return scale, zero_point.to(torch.int32)

    def _qparams_of(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        scale, zero_point = super()._qparams_of(min_val, max_val)
        # eps has shape (1,): keep the statistics' shape (a 1-D input gives (K // g,)).
        return scale.reshape(min_val.shape), zero_point.reshape(min_val.shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, " + super().extra_repr()


_MOVING_AVERAGE_OBSERVERS: tuple[type, ...] = (
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
)
if _ao_observer is not None:
    _MOVING_AVERAGE_OBSERVERS += tuple(
        getattr(_ao_observer, name)
        for name in ("MovingAverageMinMaxObserver", "MovingAveragePerChannelMinMaxObserver")
        if hasattr(_ao_observer, name)
    )


# --- fake quantize ---------------------------------------------------------------------------


def _observer_qparams(observer: nn.Module) -> tuple[Tensor, Tensor]:
    """The observer's calculate_qparams() values; without its host syncs for triton_qat's."""
    if isinstance(observer, _UniformObserver):
        return observer._qparams_for_fake_quant()
    return observer.calculate_qparams()


class FakeQuantize(FakeQuantizeBase):
    """torch.ao.quantization.FakeQuantize on triton_qat's ops.

    forward(x) = observe(x), then (when fake_quant_enabled) the fake quantization of x with
    the `scale` / `zero_point` buffers: per tensor, per channel along ch_axis, or per group
    with a PerGroupMinMaxObserver. Same buffers, attributes and state_dict as torch.ao's
    FakeQuantize; the observer may be any observer class (triton_qat's or torch.ao's).
    """

    scale: Tensor
    zero_point: Tensor

    def __init__(
        self,
        observer: Any = MovingAverageMinMaxObserver,
        quant_min: int | None = None,
        quant_max: int | None = None,
        is_dynamic: bool = False,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        if quant_min is not None and quant_max is not None:
            if quant_min > quant_max:
                raise ValueError(
                    f"quant_min must be less than or equal to quant_max, "
                    f"got {quant_min} > {quant_max}"
                )
            dtype = observer_kwargs.get("dtype", torch.quint8)
            if hasattr(observer, "p"):
                # A with_args factory keeps its dtype in p.keywords.
                dtype = getattr(getattr(observer, "p", {}), "keywords", {}).get("dtype", dtype)
            lo, hi = _dtype_range(dtype)
            if quant_min < lo:
                raise ValueError(f"quant_min {quant_min} is below {dtype}'s minimum {lo}")
            if quant_max > hi:
                raise ValueError(f"quant_max {quant_max} is above {dtype}'s maximum {hi}")
            observer_kwargs.update({"quant_min": quant_min, "quant_max": quant_max})
        observer_kwargs["is_dynamic"] = is_dynamic
        self.activation_post_process = observer(**observer_kwargs)
        # Kept for torch.ao compatibility; the observer's values are the ones used.
        self.quant_min = self.activation_post_process.quant_min
        self.quant_max = self.activation_post_process.quant_max
        self.is_dynamic = self.activation_post_process.is_dynamic
        if self.activation_post_process.qscheme == torch.per_channel_affine_float_qparams:
            raise NotImplementedError(
                "triton_qat's FakeQuantize does not support torch.per_channel_affine_float_qparams"
            )
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int))
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.group_size: int | None = getattr(self.activation_post_process, "group_size", None)
        if self.qscheme not in _PER_TENSOR + _PER_CHANNEL:
            raise ValueError(
                "Only per channel and per tensor quantization are supported in fake quantize, "
                f"got qscheme: {self.qscheme}"
            )
        self.is_per_channel = self.qscheme in _PER_CHANNEL and self.group_size is None

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """The observer's calculate_qparams()."""
        return self.activation_post_process.calculate_qparams()

    def _observer_qparams(self) -> tuple[Tensor, Tensor]:
        return _observer_qparams(self.activation_post_process)

    def observe(self, x: Tensor) -> None:
        """The statistics half of forward: update the observer with x and the scale /
        zero_point buffers from it; nothing when observer_enabled is 0."""
        if self.observer_enabled[0] == 1:
            observer = self.activation_post_process
            if isinstance(observer, _UniformObserver):
                scale, zero_point = observer._observe_for_fake_quant(x.detach())
            else:
                observer(x.detach())
                scale, zero_point = observer.calculate_qparams()
            scale = scale.to(self.scale.device)
            zero_point = zero_point.to(self.zero_point.device)
            if self.scale.shape != scale.shape:
                self.scale.resize_(scale.shape)
                self.zero_point.resize_(zero_point.shape)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)

    def _fake_quant(self, x: Tensor) -> Tensor:
        qmin = self.activation_post_process.quant_min
        qmax = self.activation_post_process.quant_max
        if self.group_size is not None:
            return fake_quantize_per_group(
                x, self.scale, self.zero_point, self.group_size, qmin, qmax
            )
        if self.is_per_channel:
            return fake_quantize_per_channel(
                x, self.scale, self.zero_point, self.ch_axis, qmin, qmax
            )
        return fake_quantize_per_tensor(x, self.scale, self.zero_point, qmin, qmax)

    def forward(self, X: Tensor) -> Tensor:
        """observe(X), then fake-quantize X when fake_quant_enabled (else X itself)."""
        self.observe(X)
        if self.fake_quant_enabled[0] == 1:
            X = self._fake_quant(X)
        return X

    def qparams(self) -> QParams | None:
        """The current scale / zero_point buffers (not copies) as a QParams, None when fake
        quantization is disabled: per tensor, per channel (axis=ch_axis) or per group."""
        if self.fake_quant_enabled[0] == 0:
            return None
        qmin = self.activation_post_process.quant_min
        qmax = self.activation_post_process.quant_max
        if self.group_size is not None:
            return QParams(self.scale, self.zero_point, qmin, qmax, group_size=self.group_size)
        if self.is_per_channel:
            return QParams(self.scale, self.zero_point, qmin, qmax, axis=self.ch_axis)
        return QParams(self.scale, self.zero_point, qmin, qmax)

    def extra_repr(self) -> str:
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, "
            f"observer_enabled={self.observer_enabled}, "
            f"quant_min={self.activation_post_process.quant_min}, "
            f"quant_max={self.activation_post_process.quant_max}, "
            f"dtype={self.dtype}, qscheme={self.qscheme}, ch_axis={self.ch_axis}{group}, "
            f"scale={self.scale}, zero_point={self.zero_point}"
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "scale"] = self.scale
        destination[prefix + "zero_point"] = self.zero_point

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        for name, buffer in (("scale", self.scale), ("zero_point", self.zero_point)):
            key = prefix + name
            if key in state_dict:
                # Per-channel qparams arrive with their own shape: resize, values copied below.
                buffer.resize_(state_dict[key].shape)
            elif strict:
                missing_keys.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class FusedMovingAvgObsFakeQuantize(FakeQuantize):
    """torch.ao.quantization.FusedMovingAvgObsFakeQuantize (all of torch.ao's default QAT
    qconfigs), with the numerics of torch.fused_moving_avg_obs_fake_quant in plain torch.

    Running min/max: run = isinf(run) ? cur : run + c * (cur - run), elementwise. While fake
    quantization is enabled, scale and zero point are recomputed from them at every call with
    ChooseQuantizationParams (not the observer's formula) and written to the buffers in place.
    Inputs of any float dtype; statistics in fp32, output in the input dtype.
    """

    def __init__(
        self,
        observer: Any = MovingAverageMinMaxObserver,
        quant_min: int = 0,
        quant_max: int = 255,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__(observer, quant_min, quant_max, **observer_kwargs)
        if not isinstance(self.activation_post_process, _MOVING_AVERAGE_OBSERVERS):
            raise TypeError(
                "FusedMovingAvgObsFakeQuantize needs a MovingAverageMinMaxObserver or a "
                "MovingAveragePerChannelMinMaxObserver, got "
                f"{type(self.activation_post_process).__name__}"
            )
        # int64 flags, as torch.ao's fused module (its op reads them as long).
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.long))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.long))
        self.is_symmetric_quant = self.activation_post_process.qscheme in _SYMMETRIC

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """The observer's calculate_qparams() (torch.ao's formula, not the fused one)."""
        return self.activation_post_process.calculate_qparams()

    def _init_channels(self, x: Tensor) -> None:
        """First per-channel call: running min/max of x.size(ch_axis) channels at +-inf."""
        observer = self.activation_post_process
        if observer.min_val.numel() != 0:
            return
        channels = x.size(self.ch_axis) if x.dim() else 1
        observer.min_val.resize_(channels).fill_(float("inf"))
        observer.max_val.resize_(channels).fill_(float("-inf"))
        # torch resizes scale / zero_point in place, keeping the old leading values; the new
        # elements are whatever memory held (zeros here).
        for buffer in (self.scale, self.zero_point):
            kept = buffer[: min(buffer.numel(), channels)].clone()
            buffer.resize_(channels).zero_()
            buffer[: kept.numel()].copy_(kept)

    def observe(self, x: Tensor) -> None:
        """The statistics half of forward: the running min/max update (when observer_enabled)
        and, as torch's fused op, the scale / zero_point refresh (when fake_quant_enabled).
        An empty x changes nothing (torch's op returns before its helper)."""
        if x.numel() == 0:
            return
        observer = self.activation_post_process
        if self.is_per_channel:
            self._init_channels(x)
        if self._observe_on_device(x):
            return
        if self.observer_enabled[0] == 1:
            # torch's op reads fp32 statistics; fp16 / bf16 inputs are reduced, then widened.
            if self.is_per_channel:
                rows = _channel_rows(x.detach(), self.ch_axis)
                min_cur, max_cur = _aminmax(rows, torch.float32, dim=1)
            else:
                min_cur, max_cur = _aminmax(x.detach(), torch.float32)
            c = observer.averaging_constant
            for run, cur in ((observer.min_val, min_cur), (observer.max_val, max_cur)):
                run.copy_(torch.where(torch.isinf(run), cur, run + c * (cur - run)))
        if self.fake_quant_enabled[0] == 1:
            scale, zero_point = _fused_qparams(
                observer.min_val,
                observer.max_val,
                observer.quant_min,
                observer.quant_max,
                self.is_symmetric_quant,
            )
            self.scale.copy_(scale.reshape(-1).to(self.scale.device))
            self.zero_point.copy_(zero_point.reshape(-1).to(self.zero_point.device))

    def _observe_on_device(self, x: Tensor) -> bool:
        """observe(x) in the observe kernels, flags read on the device (no host sync, as
        torch's fused op); False (nothing done) where the eager code must run."""
        observer = self.activation_post_process
        if not _kernel_range(observer.quant_min, observer.quant_max):
            return False
        kernels = _observe_kernels(x, observer.min_val, observer.max_val, self.scale)
        if kernels is None or self.zero_point.dtype != torch.int32:
            return False
        if not self.zero_point.is_contiguous():
            return False
        channels = x.size(self.ch_axis) if self.is_per_channel and x.dim() else 1
        buffers = (observer.min_val, observer.max_val, self.scale, self.zero_point)
        if any(b.numel() != channels for b in buffers):
            return False
        kernels.observe(
            x.detach(),
            observer.min_val,
            observer.max_val,
            axis=self.ch_axis if self.is_per_channel and x.dim() else None,
            update=kernels.FUSED_MOVING_AVERAGE,
            averaging_constant=observer.averaging_constant,
            qparams=kernels.FUSED_QPARAMS,
            scale=self.scale,
            zero_point=self.zero_point,
            quant_min=observer.quant_min,
            quant_max=observer.quant_max,
            symmetric=self.is_symmetric_quant,
            flags=(self.observer_enabled, self.fake_quant_enabled),
        )
        return True

    def forward(self, X: Tensor) -> Tensor:
        """observe(X), then fake-quantize X when fake_quant_enabled (else a copy of X)."""
        self.observe(X)
        if self.fake_quant_enabled[0] == 1 and X.numel() != 0:
            return self._fake_quant(X)
        return X.clone()

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, "
            f"observer_enabled={self.observer_enabled}, "
            f"scale={self.scale}, zero_point={self.zero_point}, dtype={self.dtype}, "
            f"quant_min={self.activation_post_process.quant_min}, "
            f"quant_max={self.activation_post_process.quant_max}, "
            f"qscheme={self.qscheme}, ch_axis={self.ch_axis}, "
            f"reduce_range={self.activation_post_process.reduce_range}"
        )


def per_token_qparams(
    x: Tensor,
    quant_min: int,
    quant_max: int,
    qscheme: torch.qscheme = torch.per_tensor_affine,
    dtype: torch.dtype = torch.qint8,
    eps: float = torch.finfo(torch.float32).eps,
) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) of each row of x.reshape(-1, x.shape[-1]) from its own min / max,
    with torch.ao's Python observer formulas (symmetric or affine per `qscheme`)."""
    spec = _per_token_spec(quant_min, quant_max, qscheme, dtype, eps)
    rows = x.detach().reshape(-1, x.shape[-1])
    return per_token_qparams_ref(
        rows, quant_min, quant_max, spec.symmetric, spec.symmetric_zero_point, spec.eps
    )


def _per_token_spec(
    quant_min: int, quant_max: int, qscheme: torch.qscheme, dtype: torch.dtype, eps: float
) -> PerTokenQParams:
    custom = (quant_min, quant_max) != _dtype_range(dtype)
    return PerTokenQParams(
        quant_min,
        quant_max,
        symmetric=qscheme in _SYMMETRIC,
        symmetric_zero_point=_symmetric_zero_point(quant_min, quant_max, dtype, custom),
        eps=eps,
    )


def fake_quantize_per_token(
    x: Tensor,
    quant_min: int,
    quant_max: int,
    qscheme: torch.qscheme = torch.per_tensor_affine,
    dtype: torch.dtype = torch.qint8,
    eps: float = torch.finfo(torch.float32).eps,
) -> Tensor:
    """Dynamic per-token fake quant: each row (token) with its own qparams; straight-through
    for x, the qparams are constants for autograd."""
    if x.numel() == 0:
        return x
    scale, zero_point = per_token_qparams(x, quant_min, quant_max, qscheme, dtype, eps)
    rows = x.reshape(-1, x.shape[-1])
    y = fake_quantize_per_channel(rows, scale, zero_point, 0, quant_min, quant_max)
    return y.reshape(x.shape)


class DynamicPerTokenFakeQuantize(FakeQuantizeBase):
    """Dynamic per-token fake quant of activations (torchao's 8da4w / w8a8 recipes).

    Each row along the last dim (a token) gets its own qparams from its current min / max,
    with the formulas of torch.ao's Python observers (symmetric or affine per `qscheme`);
    nothing is kept between calls, so there is no observer state (fake_quantize_per_token).
    """

    is_dynamic = True

    def __init__(
        self,
        dtype: torch.dtype = torch.qint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int | None = None,
        quant_max: int | None = None,
        eps: float = torch.finfo(torch.float32).eps,
    ) -> None:
        super().__init__()
        if qscheme not in _PER_TENSOR:
            raise ValueError(
                "qscheme selects the per-token formula: per_tensor_affine or "
                f"per_tensor_symmetric, got {qscheme}"
            )
        self.dtype, self.qscheme, self.eps = dtype, qscheme, eps
        if quant_min is None or quant_max is None:
            quant_min, quant_max = _dtype_range(dtype)
        self.quant_min, self.quant_max = quant_min, quant_max

    def calculate_qparams(self, x: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """Per-token (scale, zero_point) of `x`: dynamic qparams exist only for an input."""
        if x is None:
            raise ValueError("dynamic per-token qparams are computed from an input: pass x")
        return per_token_qparams(
            x, self.quant_min, self.quant_max, self.qscheme, self.dtype, self.eps
        )

    def observe(self, x: Tensor) -> None:
        """Nothing to observe: the qparams come from each call's own tokens."""

    def qparams(self) -> QParams | None:
        """None: per-token qparams exist only for a given input (calculate_qparams(x))."""
        return None

    def per_token_spec(self) -> PerTokenQParams | None:
        """This quantizer as the fused linear's dynamic input spec (None when fake quant is
        disabled): the GEMM computes each row's qparams from the input it is given."""
        if self.fake_quant_enabled[0] == 0:
            return None
        return _per_token_spec(self.quant_min, self.quant_max, self.qscheme, self.dtype, self.eps)

    def forward(self, X: Tensor) -> Tensor:
        if self.fake_quant_enabled[0] == 0:
            return X
        return fake_quantize_per_token(
            X, self.quant_min, self.quant_max, self.qscheme, self.dtype, self.eps
        )

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, dtype={self.dtype}, "
            f"qscheme={self.qscheme}, quant_min={self.quant_min}, quant_max={self.quant_max}"
        )


# --- learnable scale and zero point (LSQ) ------------------------------------------------------


class LearnableFakeQuantize(FakeQuantizeBase):
    """torch.ao.quantization._learnable_fake_quantize._LearnableFakeQuantize on triton_qat's
    ops: `scale` and `zero_point` are nn.Parameters trained by backpropagation (LSQ,
    https://openreview.net/pdf?id=rkgO66VKDS), per tensor or per channel along ch_axis.

    Same arguments, buffers (fake_quant_enabled, observer_enabled, static_enabled,
    learning_enabled, eps), state_dict layout and methods as torch.ao's. While
    static_enabled is 1 the observer sees each input and overwrites scale and zero_point;
    otherwise scale is clamped to eps and the parameters are what the optimizer made them.
    use_grad_scaling: gradients of scale and zero point scaled by 1 / sqrt(numel * quant_max).

    Beyond torch.ao: channel_len -1 with a per-channel observer sizes the parameters from the
    first observation (and from a loaded state_dict); init_from_observer True switches to
    parameter learning (enable_param_learning) right after the first observation, so that
    the observer only initialises the parameters.
    """

    scale: nn.Parameter
    zero_point: nn.Parameter
    static_enabled: Tensor
    learning_enabled: Tensor
    eps: Tensor

    def __init__(
        self,
        observer: Any = MovingAverageMinMaxObserver,
        quant_min: int = 0,
        quant_max: int = 255,
        scale: float = 1.0,
        zero_point: float = 0.0,
        channel_len: int = -1,
        use_grad_scaling: bool = False,
        init_from_observer: bool = False,
        **observer_kwargs: Any,
    ) -> None:
        super().__init__()
        if quant_min >= quant_max:
            raise ValueError(
                f"quant_min must be strictly less than quant_max, got {quant_min} >= {quant_max}"
            )
        self.quant_min = quant_min
        self.quant_max = quant_max
        observer_kwargs["quant_min"] = quant_min
        observer_kwargs["quant_max"] = quant_max
        self.use_grad_scaling = use_grad_scaling
        self.init_from_observer = init_from_observer
        if channel_len != -1 and (
            isinstance(channel_len, bool) or not isinstance(channel_len, int) or channel_len <= 0
        ):
            raise ValueError(f"channel_len must be a positive int or -1, got {channel_len!r}")
        n = 1 if channel_len == -1 else channel_len
        self.scale = nn.Parameter(torch.tensor([scale] * n))
        self.zero_point = nn.Parameter(torch.tensor([zero_point] * n))
        self.activation_post_process = observer(**observer_kwargs)
        lo, hi = _dtype_range(self.activation_post_process.dtype)
        if quant_min < lo:
            raise ValueError(f"quant_min {quant_min} is below the observer dtype's minimum {lo}")
        if quant_max > hi:
            raise ValueError(f"quant_max {quant_max} is above the observer dtype's maximum {hi}")
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        if self.qscheme not in _PER_TENSOR + _PER_CHANNEL:
            raise ValueError(f"qscheme must be per tensor or per channel, got {self.qscheme}")
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("static_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        bitrange = torch.tensor(quant_max - quant_min + 1).double()
        self.bitwidth = int(torch.log2(bitrange).item())
        self.register_buffer("eps", torch.tensor([torch.finfo(torch.float32).eps]))

    def enable_param_learning(self) -> LearnableFakeQuantize:
        """Learn scale and zero point; fake quant on, observer updates off."""
        self.toggle_qparam_learning(enabled=True).toggle_fake_quant(
            enabled=True
        ).toggle_observer_update(enabled=False)
        return self

    def enable_static_estimate(self) -> None:
        """Observer estimates, no learning; fake quant on."""
        self.toggle_qparam_learning(enabled=False).toggle_fake_quant(
            enabled=True
        ).toggle_observer_update(enabled=True)

    def enable_static_observation(self) -> None:
        """Observer accumulates statistics; no learning, and forward returns its input."""
        self.toggle_qparam_learning(enabled=False).toggle_fake_quant(
            enabled=False
        ).toggle_observer_update(enabled=True)

    def toggle_observer_update(self, enabled: bool = True) -> LearnableFakeQuantize:
        self.static_enabled[0] = int(enabled)
        return self

    def enable_observer(self, enabled: bool = True) -> None:
        self.toggle_observer_update(enabled)

    def toggle_qparam_learning(self, enabled: bool = True) -> LearnableFakeQuantize:
        self.learning_enabled[0] = int(enabled)
        self.scale.requires_grad = enabled
        self.zero_point.requires_grad = enabled
        return self

    def toggle_fake_quant(self, enabled: bool = True) -> LearnableFakeQuantize:
        self.fake_quant_enabled[0] = int(enabled)
        return self

    def observe_quant_params(self) -> None:
        print(f"LearnableFakeQuantize Scale: {self.scale.detach()}")
        print(f"LearnableFakeQuantize Zero Point: {self.zero_point.detach()}")

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(scale clamped to eps, zero point rounded and clamped, int64), as torch.ao."""
        self.scale.data.clamp_(min=self.eps.item())
        scale = self.scale.detach()
        zero_point = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max).long()
        return scale, zero_point

    def qparams(self) -> QParams | None:
        """The qparams the next forward applies (scale clamped to eps, zero point rounded and
        clamped, as int32), detached; None when fake quantization is disabled (for convert)."""
        if self.fake_quant_enabled[0] == 0:
            return None
        scale = self.scale.detach().clamp(min=self.eps.item())
        zero_point = self.zero_point.detach()
        if self.qscheme in _SYMMETRIC:
            zero_point = torch.zeros_like(zero_point)
        zero_point = zero_point.round().clamp(self.quant_min, self.quant_max).to(torch.int32)
        axis = self.ch_axis if self.qscheme in _PER_CHANNEL else None
        return QParams(scale, zero_point, self.quant_min, self.quant_max, axis=axis)

    def _set_param(self, param: nn.Parameter, value: Tensor) -> None:
        value = value.to(device=param.device, dtype=param.dtype)
        if param.shape != value.shape:
            param.data = value.clone()  # per channel with channel_len -1: sized on first use
        else:
            param.data.copy_(value)

    def forward(self, X: Tensor) -> Tensor:
        if self.static_enabled[0] == 1:
            self.activation_post_process(X.detach())
            scale, zero_point = _observer_qparams(self.activation_post_process)
            self._set_param(self.scale, scale)
            self._set_param(self.zero_point, zero_point)
            if self.init_from_observer:
                self.enable_param_learning()
        else:
            self.scale.data.clamp_(min=self.eps.item())
        if self.fake_quant_enabled[0] == 1:
            if self.qscheme in _SYMMETRIC:
                self.zero_point.data.zero_()
            if self.use_grad_scaling:
                grad_factor = 1.0 / (X.numel() * self.quant_max) ** 0.5
            else:
                grad_factor = 1.0
            if self.qscheme in _PER_CHANNEL:
                X = fake_quantize_learnable_per_channel(
                    X,
                    self.scale,
                    self.zero_point,
                    self.ch_axis,
                    self.quant_min,
                    self.quant_max,
                    grad_factor,
                )
            else:
                X = fake_quantize_learnable(
                    X, self.scale, self.zero_point, self.quant_min, self.quant_max, grad_factor
                )
        return X

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        for name in ("scale", "zero_point"):
            value = state_dict.get(prefix + name)
            param = getattr(self, name)
            if value is not None and value.shape != param.shape:
                param.data = param.data.new_empty(value.shape)  # values copied below
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"fake_quant_enabled={self.fake_quant_enabled}, static_enabled={self.static_enabled}, "
            f"learning_enabled={self.learning_enabled}, quant_min={self.quant_min}, "
            f"quant_max={self.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
            f"ch_axis={self.ch_axis}, use_grad_scaling={self.use_grad_scaling}"
        )
