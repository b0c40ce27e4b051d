"""LearnableFakeQuantize: torch.ao's _LearnableFakeQuantize (LSQ), learnable scale and
zero point."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from triton_qat.numerics.observer_formulas import (
    PER_CHANNEL_SCHEMES,
    PER_TENSOR_SCHEMES,
    SYMMETRIC_SCHEMES,
    dtype_range,
)
from triton_qat.numerics.qparams import QParams
from triton_qat.ops.functional import (
    fake_quantize_learnable,
    fake_quantize_learnable_per_channel,
)
from triton_qat.quantizers.base import FakeQuantizeBase, in_backward_pass
from triton_qat.quantizers.fake_quantize import _observer_qparams
from triton_qat.quantizers.observers import MovingAverageMinMaxObserver

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
        lo, hi = dtype_range(self.activation_post_process.dtype)
        if quant_min < lo:
            raise ValueError(f"quant_min {quant_min} is below the observer dtype's minimum {lo}")
        if quant_max > hi:
            raise ValueError(f"quant_max {quant_max} is above the observer dtype's maximum {hi}")
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        if self.qscheme not in PER_TENSOR_SCHEMES + PER_CHANNEL_SCHEMES:
            raise ValueError(f"qscheme must be per tensor or per channel, got {self.qscheme}")
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("static_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        bitrange = torch.tensor(quant_max - quant_min + 1).double()
        self.bitwidth = int(torch.log2(bitrange).item())
        self.register_buffer("eps", torch.tensor([torch.finfo(torch.float32).eps]))
        self._sync_flags()

    # static_enabled plays the observer flag's part (torch.ao's module has no observer_enabled).
    _FLAG_BUFFERS = ("fake_quant_enabled", "static_enabled")

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
        self._set_flag("static_enabled", enabled)
        return self

    def enable_observer(self, enabled: bool = True) -> None:
        self.toggle_observer_update(enabled)

    def toggle_qparam_learning(self, enabled: bool = True) -> LearnableFakeQuantize:
        self.learning_enabled[0] = int(enabled)
        # Set only when it changes: torch.compile cannot trace the assignment.
        for param in (self.scale, self.zero_point):
            if param.requires_grad != enabled:
                param.requires_grad = enabled
        return self

    def toggle_fake_quant(self, enabled: bool = True) -> LearnableFakeQuantize:
        self._set_flag("fake_quant_enabled", enabled)
        return self

    def _size_channels(self, channels: int) -> None:
        """Per channel with channel_len -1: size scale and zero point for `channels` channels
        before the first observation (what the first observation would do), so that a
        compiled forward, which cannot change a Parameter's shape, starts with the final one."""
        if self.qscheme not in PER_CHANNEL_SCHEMES or self.scale.numel() == channels:
            return
        for param in (self.scale, self.zero_point):
            param.data = param.data[:1].expand(channels).clone()

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
        if self.qscheme in SYMMETRIC_SCHEMES:
            zero_point = torch.zeros_like(zero_point)
        zero_point = zero_point.round().clamp(self.quant_min, self.quant_max).to(torch.int32)
        axis = self.ch_axis if self.qscheme in PER_CHANNEL_SCHEMES else None
        return QParams(scale, zero_point, self.quant_min, self.quant_max, axis=axis)

    def _set_param(self, param: nn.Parameter, value: Tensor) -> None:
        value = value.to(device=param.device, dtype=param.dtype)
        if param.shape != value.shape:
            param.data = value.clone()  # per channel with channel_len -1: sized on first use
        elif torch.compiler.is_compiling():
            with torch.no_grad():  # .data cannot be traced; the same values
                param.copy_(value)
        else:
            param.data.copy_(value)

    def _clamp_scale(self) -> None:
        if torch.compiler.is_compiling():
            with torch.no_grad():  # eps as a tensor: no .item() in the graph; the same values
                self.scale.clamp_(min=self.eps)
        else:
            self.scale.data.clamp_(min=self.eps.item())

    def forward(self, X: Tensor) -> Tensor:
        if self._flag("static_enabled"):
            # Not again when activation checkpointing recomputes this forward.
            if not in_backward_pass():
                self.activation_post_process(X.detach())
                scale, zero_point = _observer_qparams(self.activation_post_process)
                self._set_param(self.scale, scale)
                self._set_param(self.zero_point, zero_point)
                if self.init_from_observer:
                    self.enable_param_learning()
        else:
            self._clamp_scale()
        if self._flag("fake_quant_enabled"):
            if self.qscheme in SYMMETRIC_SCHEMES:
                if torch.compiler.is_compiling():
                    with torch.no_grad():
                        self.zero_point.zero_()
                else:
                    self.zero_point.data.zero_()
            if self.use_grad_scaling:
                grad_factor = 1.0 / (X.numel() * self.quant_max) ** 0.5
            else:
                grad_factor = 1.0
            # float32 qparams even where a mixed-precision wrapper hands bf16 Parameters (a
            # no-op otherwise); their gradients flow back through the cast.
            scale, zero_point = self.scale.float(), self.zero_point.float()
            if self.qscheme in PER_CHANNEL_SCHEMES:
                X = fake_quantize_learnable_per_channel(
                    X,
                    scale,
                    zero_point,
                    self.ch_axis,
                    self.quant_min,
                    self.quant_max,
                    grad_factor,
                )
            else:
                X = fake_quantize_learnable(
                    X, scale, zero_point, self.quant_min, self.quant_max, grad_factor
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
