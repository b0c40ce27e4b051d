"""Observers: drop-ins for torch.ao.quantization.observer's MinMax / MovingAverage classes
per tensor and per channel, plus PerGroupMinMaxObserver."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from triton_qat.numerics.observer_formulas import (
    ALLOWED_DTYPES,
    FLOAT_QPARAMS,
    FP32_EPS,
    PER_CHANNEL_SCHEMES,
    PER_TENSOR_SCHEMES,
    SYMMETRIC_SCHEMES,
    check_min_max_valid,
    observer_minmax_qparams,
    quant_range,
    symmetric_zero_point,
)
from triton_qat.numerics.qparams import FLOAT_DTYPES, QUANT_LIMIT
from triton_qat.ops.backend import use_triton
from triton_qat.quantizers.base import ObserverBase, _ao_observer, _resize_buffer

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
    (the eager code runs). Under torch.compile the eager code is traced instead: the kernels
    are not custom ops, and the compiler fuses the few reductions itself."""
    if x.numel() == 0 or x.dtype not in FLOAT_DTYPES or torch.compiler.is_compiling():
        return None
    for b in buffers:
        if b.dtype != torch.float32 or b.device != x.device or not b.is_contiguous():
            return None
    if not use_triton(x.device):
        return None
    # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
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
        eps: float = FP32_EPS,
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
        if qscheme not in (*PER_TENSOR_SCHEMES, *PER_CHANNEL_SCHEMES, FLOAT_QPARAMS):
            raise ValueError(
                "qscheme must be per_tensor_affine, per_tensor_symmetric, per_channel_affine, "
                f"per_channel_symmetric or per_channel_affine_float_qparams, got {qscheme}"
            )
        if dtype not in ALLOWED_DTYPES:
            raise ValueError(f"dtype must be one of {ALLOWED_DTYPES}, got {dtype}")
        self.quant_min, self.quant_max, self.has_customized_qrange = quant_range(
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
            state_dict[prefix + "eps"] = torch.tensor([FP32_EPS])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _qparams_of(self, min_val: Tensor, max_val: Tensor) -> tuple[Tensor, Tensor]:
        return observer_minmax_qparams(
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
        if not check_min_max_valid(min_val, max_val):
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
        if with_qparams and self.qscheme == FLOAT_QPARAMS:
            # The qparams kernel writes integer zero points: the statistics come from the one
            # reduction pass, the float zero points from the per-row formula on min / max.
            kernels.observe(x.detach(), self.min_val, self.max_val, **args)
            return self._qparams_for_fake_quant()
        scale = zero_point = None
        if with_qparams:
            n = self.min_val.numel()
            scale = torch.empty(n, dtype=torch.float32, device=x.device)
            zero_point = torch.empty(n, dtype=torch.int32, device=x.device)
            symmetric = self.qscheme in SYMMETRIC_SCHEMES
            args.update(
                qparams=kernels.OBSERVER_QPARAMS,
                scale=scale,
                zero_point=zero_point,
                quant_min=self.quant_min,
                quant_max=self.quant_max,
                symmetric=symmetric,
                zp_symmetric=symmetric_zero_point(
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
        zp_dtype = torch.int64 if self.qscheme in SYMMETRIC_SCHEMES else torch.int32
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
        eps: float = FP32_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if qscheme not in PER_TENSOR_SCHEMES:
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
        eps: float = FP32_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if qscheme not in PER_TENSOR_SCHEMES:
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
        if self.min_val.shape != min_val.shape or self.max_val.shape != max_val.shape:
            _resize_buffer(self, "min_val", min_val.shape)
            _resize_buffer(self, "max_val", max_val.shape)
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
        eps: float = FP32_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if qscheme not in (*PER_CHANNEL_SCHEMES, FLOAT_QPARAMS):
            raise NotImplementedError(
                f"{type(self).__name__}'s qscheme must be torch.per_channel_symmetric, "
                f"torch.per_channel_affine or torch.per_channel_affine_float_qparams, got {qscheme}"
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
        eps: float = FP32_EPS,
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
        eps: float = FP32_EPS,
        is_dynamic: bool = False,
        factory_kwargs: dict | None = None,
    ) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        if qscheme not in PER_TENSOR_SCHEMES + PER_CHANNEL_SCHEMES:
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
