"""FakeQuantize and FusedMovingAvgObsFakeQuantize: torch.ao's modules, fake-quantizing
through triton_qat.ops.functional."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from triton_qat.numerics.observer_formulas import (
    FLOAT_QPARAMS,
    PER_CHANNEL_SCHEMES,
    PER_TENSOR_SCHEMES,
    SYMMETRIC_SCHEMES,
    dtype_range,
    fused_qparams,
)
from triton_qat.numerics.qparams import QParams
from triton_qat.ops.functional import (
    fake_quantize_per_channel,
    fake_quantize_per_group,
    fake_quantize_per_tensor,
)
from triton_qat.quantizers.base import FakeQuantizeBase, _resize_buffer, in_backward_pass
from triton_qat.quantizers.observers import (
    _MOVING_AVERAGE_OBSERVERS,
    MovingAverageMinMaxObserver,
    _aminmax,
    _channel_rows,
    _kernel_range,
    _observe_kernels,
    _UniformObserver,
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
            lo, hi = dtype_range(dtype)
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
        # A float zero point per channel with per_channel_affine_float_qparams, as torch.ao.
        float_zp = self.activation_post_process.qscheme == FLOAT_QPARAMS
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float))
        self.register_buffer(
            "zero_point", torch.tensor([0], dtype=torch.float if float_zp else torch.int)
        )
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.group_size: int | None = getattr(self.activation_post_process, "group_size", None)
        if self.qscheme not in (*PER_TENSOR_SCHEMES, *PER_CHANNEL_SCHEMES, FLOAT_QPARAMS):
            raise ValueError(
                "Only per channel and per tensor quantization are supported in fake quantize, "
                f"got qscheme: {self.qscheme}"
            )
        per_channel = self.qscheme in (*PER_CHANNEL_SCHEMES, FLOAT_QPARAMS)
        self.is_per_channel = per_channel and self.group_size is None

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """The observer's calculate_qparams()."""
        return self.activation_post_process.calculate_qparams()

    def _observer_qparams(self) -> tuple[Tensor, Tensor]:
        return _observer_qparams(self.activation_post_process)

    def observe(self, x: Tensor) -> None:
        """The statistics half of forward: update the observer with x and the scale /
        zero_point buffers from it; nothing when observer_enabled is 0, nor when activation
        checkpointing recomputes the forward (in_backward_pass)."""
        if self._flag("observer_enabled") and not in_backward_pass():
            observer = self.activation_post_process
            if isinstance(observer, _UniformObserver):
                scale, zero_point = observer._observe_for_fake_quant(x.detach())
            else:
                observer(x.detach())
                scale, zero_point = observer.calculate_qparams()
            scale = scale.to(self.scale.device)
            zero_point = zero_point.to(self.zero_point.device)
            if self.scale.shape != scale.shape:
                _resize_buffer(self, "scale", scale.shape)
                _resize_buffer(self, "zero_point", zero_point.shape)
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
        if self._flag("fake_quant_enabled"):
            X = self._fake_quant(X)
        return X

    def qparams(self) -> QParams | None:
        """The current scale / zero_point buffers (not copies) as a QParams, None when fake
        quantization is disabled: per tensor, per channel (axis=ch_axis) or per group."""
        if not self._flag("fake_quant_enabled"):
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
        if self.qscheme == FLOAT_QPARAMS:
            raise NotImplementedError(
                "FusedMovingAvgObsFakeQuantize does not support torch.per_channel_affine_float_"
                "qparams (torch's fused op takes integer zero points); use FakeQuantize"
            )
        if not isinstance(self.activation_post_process, _MOVING_AVERAGE_OBSERVERS):
            raise TypeError(
                "FusedMovingAvgObsFakeQuantize needs a MovingAverageMinMaxObserver or a "
                "MovingAveragePerChannelMinMaxObserver, got "
                f"{type(self.activation_post_process).__name__}"
            )
        # int64 flags, as torch.ao's fused module (its op reads them as long).
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.long))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.long))
        self._sync_flags()
        self.is_symmetric_quant = self.activation_post_process.qscheme in SYMMETRIC_SCHEMES

    def calculate_qparams(self) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """The observer's calculate_qparams() (torch.ao's formula, not the fused one)."""
        return self.activation_post_process.calculate_qparams()

    def _init_channels(self, x: Tensor) -> None:
        """First per-channel call: running min/max of x.size(ch_axis) channels at +-inf."""
        observer = self.activation_post_process
        if observer.min_val.numel() != 0:
            return
        channels = x.size(self.ch_axis) if x.dim() else 1
        _resize_buffer(observer, "min_val", (channels,)).fill_(float("inf"))
        _resize_buffer(observer, "max_val", (channels,)).fill_(float("-inf"))
        # torch resizes scale / zero_point in place, keeping the old leading values; the new
        # elements are whatever memory held (zeros here).
        for name in ("scale", "zero_point"):
            buffer = getattr(self, name)
            kept = buffer[: min(buffer.numel(), channels)].clone()
            buffer = _resize_buffer(self, name, (channels,)).zero_()
            buffer[: kept.numel()].copy_(kept)

    def observe(self, x: Tensor) -> None:
        """The statistics half of forward: the running min/max update (when observer_enabled)
        and, as torch's fused op, the scale / zero_point refresh (when fake_quant_enabled).
        An empty x changes nothing (torch's op returns before its helper), nor does a forward
        that activation checkpointing recomputes (in_backward_pass: the qparams stay those the
        first forward computed, which a refresh from unchanged statistics would give again)."""
        if x.numel() == 0 or in_backward_pass():
            return
        observer = self.activation_post_process
        if self.is_per_channel:
            self._init_channels(x)
        if self._observe_on_device(x):
            return
        if self._flag("observer_enabled"):
            # torch's op reads fp32 statistics; fp16 / bf16 inputs are reduced, then widened.
            if self.is_per_channel:
                rows = _channel_rows(x.detach(), self.ch_axis)
                min_cur, max_cur = _aminmax(rows, torch.float32, dim=1)
            else:
                min_cur, max_cur = _aminmax(x.detach(), torch.float32)
            c = observer.averaging_constant
            for run, cur in ((observer.min_val, min_cur), (observer.max_val, max_cur)):
                run.copy_(torch.where(torch.isinf(run), cur, run + c * (cur - run)))
        if self._flag("fake_quant_enabled"):
            scale, zero_point = fused_qparams(
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
        if X.numel() != 0 and self._flag("fake_quant_enabled"):
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
