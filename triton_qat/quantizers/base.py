"""Base classes of the observers and fake-quant modules, and torch.ao's with_args factories.

With torch.ao installed the bases derive from torch.ao's (isinstance checks and torch.ao's
helpers such as enable_observer work); without it they are plain nn.Modules with the same
buffers and methods.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

try:  # torch.ao is optional: the package works without it
    import torch.ao.quantization.fake_quantize as _ao_fake_quantize
    import torch.ao.quantization.observer as _ao_observer
except Exception:  # an ImportError, or a broken install raising anything
    _ao_fake_quantize = None
    _ao_observer = None


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


def _resize_buffer(module: nn.Module, name: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """module's buffer `name` with shape `shape` (contents unspecified where new): resized in
    place eagerly, as torch.ao; under torch.compile (which cannot trace a resize) replaced by
    a new tensor, the only difference being the buffer's identity."""
    buffer = getattr(module, name)
    if torch.compiler.is_compiling():
        buffer = buffer.new_zeros(shape)
        setattr(module, name, buffer)
        return buffer
    return buffer.resize_(shape)


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


def in_backward_pass() -> bool:
    """Whether autograd's engine is running a backward on this thread. A module forward run
    then is activation checkpointing recomputing one (torch.utils.checkpoint, transformers'
    gradient_checkpointing_enable): the observers must not update a second time, so the
    recomputed fake quant uses the qparams the first forward used."""
    if torch.compiler.is_compiling():
        return False  # a compiled graph's recomputation is the compiler's
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


def keep_state_dtypes(module: nn.Module, apply: Any, fn: Any, recurse: bool) -> nn.Module:
    """nn.Module._apply that moves a quantizer's own tensors but keeps their dtypes.

    Observer statistics, scales, zero points and learnable qparams stay float32 whatever the
    model is cast to (model.to(torch.bfloat16), .half(), a mixed-precision wrapper that casts
    every floating tensor): their formulas are float32 ones (NUMERICS.md), as torchao keeps
    its fake quantizers' state. Device moves apply as usual.
    """
    own = {
        name: t.dtype
        for name, t in (*module._parameters.items(), *module._buffers.items())
        if t is not None and t.is_floating_point()
    }
    apply(fn, recurse)
    for name, dtype in own.items():
        if name in module._parameters:
            param = module._parameters[name]
            if param is not None and param.dtype != dtype:
                param.data = param.data.to(dtype)
        else:
            buf = module._buffers[name]
            if buf is not None and buf.dtype != dtype:
                module._buffers[name] = buf.to(dtype)
    return module


class ObserverBase(_ObserverRoot):
    """Base of triton_qat's observers: torch.ao's ObserverBase when torch.ao is installed.
    Casting the module never changes the dtype of its state (keep_state_dtypes)."""

    with_args = classmethod(_with_args)
    with_callable_args = classmethod(_with_callable_args)

    def _apply(self, fn, recurse=True):
        return keep_state_dtypes(self, super()._apply, fn, recurse)


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
    enable/disable_observer and enable/disable_fake_quant helpers act on it. Casting the module
    never changes the dtype of its state (keep_state_dtypes).

    The flag buffers (fake_quant_enabled, observer_enabled, LSQ's static_enabled) stay the
    state (state_dict, DDP). Each has a Python mirror (`_flags`), set by the enable / disable
    / toggle methods, by load_state_dict and by every eager forward (which reads the buffers,
    as torch.ao does). Under torch.compile forward reads the mirrors instead: a guard on a
    Python value, no data-dependent branch and no host sync. Toggling a flag recompiles once
    per combination of flags, and a combination seen before reuses its graph. A value written
    straight into a buffer reaches compiled code after the next eager forward or state_dict
    load.
    """

    # The buffers whose values forward branches on.
    _FLAG_BUFFERS: tuple[str, ...] = ("fake_quant_enabled", "observer_enabled")

    def __init__(self) -> None:
        super().__init__()
        self._flags: dict[str, bool] = {}
        self._sync_flags()

    def _flag(self, name: str) -> bool:
        """Whether the flag buffer `name` is 1: its mirror under torch.compile, else the
        buffer itself (a host read, as torch.ao's modules), which refreshes the mirror."""
        flags = self.__dict__.get("_flags")
        if torch.compiler.is_compiling() and flags is not None and name in flags:
            return flags[name]
        on = bool(getattr(self, name)[0] == 1)
        if flags is not None and not torch.compiler.is_compiling():
            flags[name] = on
        return on

    def _sync_flags(self) -> None:
        """Mirror the flag buffers' values (host reads)."""
        self.__dict__.setdefault("_flags", {})
        for name in self._FLAG_BUFFERS:
            buffer = getattr(self, name, None)
            if isinstance(buffer, Tensor) and buffer.numel() > 0:
                self._flags[name] = bool(buffer[0] == 1)

    def _set_flag(self, name: str, enabled: bool) -> None:
        getattr(self, name)[0] = 1 if enabled else 0
        self.__dict__.setdefault("_flags", {})[name] = bool(enabled)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self._set_flag("fake_quant_enabled", enabled)

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> None:
        self._set_flag("observer_enabled", enabled)

    def disable_observer(self) -> None:
        self.enable_observer(False)

    def _apply(self, fn, recurse=True):
        return keep_state_dtypes(self, super()._apply, fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_flags()

    @classmethod
    def with_args(cls, **kwargs: Any) -> Any:
        """A factory: `FakeQuantize.with_args(...)()` builds the module; chainable."""
        return _with_args(cls, **kwargs)
