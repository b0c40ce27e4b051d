"""QConfig, the registry of named qconfigs, its presets, and adapting torch.ao QConfigs.

A qconfig says how a layer is fake-quantized: a factory of the weight's fake-quant module
and, optionally, one of the input's. Everything in triton_qat that takes a qconfig takes a
registered name, a `QConfig`, or a torch.ao.quantization.QConfig (`resolve_qconfig`).
torch.ao is optional: this module imports and works without it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from triton_qat import quantizers

Factory = Callable[[], torch.nn.Module]

_TORCH_AO_PACKAGE = "torch.ao.quantization"
_BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


@dataclass(frozen=True)
class QConfig:
    """How triton_qat fake-quantizes a layer.

    weight: a zero-argument factory of the weight's fake-quant module (a class, or
        `FakeQuantize.with_args(...)`), called once per layer.
    activation: a factory of the activation fake quant, or None.
    quantize_input: where the activation fake quant goes. torch.ao puts it on module
        OUTPUTS (an `activation_post_process` added by prepare_qat, so a layer's input was
        quantized by the layer before it). triton_qat puts it on the layer's INPUT: with
        quantize_input True, triton_qat's Linear fake-quantizes its input with `activation`,
        fused into the GEMM's prologue (same numerics, no extra pass over memory). False: the
        input is left as it is, as torch.ao.nn.qat.Linear does; adapted torch.ao QConfigs
        get False, so that the layer is a drop-in for torch.ao's.
    """

    weight: Factory
    activation: Factory | None = None
    quantize_input: bool = True

    def __post_init__(self) -> None:
        _check_factory(self.weight, "weight", allow_none=False)
        _check_factory(self.activation, "activation", allow_none=True)
        if not isinstance(self.quantize_input, bool):
            raise TypeError(
                f"QConfig: quantize_input must be a bool, got {type(self.quantize_input).__name__}"
            )


def _check_factory(factory: object, name: str, *, allow_none: bool) -> None:
    if factory is None and allow_none:
        return
    if isinstance(factory, torch.nn.Module):
        raise TypeError(
            f"QConfig: {name} must be a factory (a class or Class.with_args(...)) that builds "
            f"a new module per layer, got a {type(factory).__name__} instance"
        )
    if not callable(factory):
        expected = "a callable factory or None" if allow_none else "a callable factory"
        raise TypeError(f"QConfig: {name} must be {expected}, got {type(factory).__name__}")


# ---------------------------------------------------------------------------------------------
# Registry. A value is a QConfig, or (built-in presets) a builder run on the first lookup:
# the builders import triton_qat.quantizers and torch.ao, which import time need not pay.

_REGISTRY: dict[str, QConfig | Callable[[], QConfig]] = {}


def register_qconfig(name: str, qconfig: QConfig, *, overwrite: bool = False) -> None:
    """Register `qconfig` under `name`. A taken name is a ValueError unless `overwrite`."""
    if not isinstance(name, str):
        raise TypeError(f"register_qconfig: name must be a str, got {type(name).__name__}")
    if not isinstance(qconfig, QConfig):
        raise TypeError(
            "register_qconfig: qconfig must be a triton_qat.QConfig, got "
            f"{type(qconfig).__module__}.{type(qconfig).__qualname__} "
            "(resolve_qconfig adapts a torch.ao QConfig)"
        )
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"register_qconfig: a qconfig named {name!r} is already registered; "
            "pass overwrite=True to replace it"
        )
    _REGISTRY[name] = qconfig


def get_qconfig(name: str) -> QConfig:
    """The QConfig registered under `name`; a KeyError listing the known names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"get_qconfig: name must be a str, got {type(name).__name__}")
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"no qconfig named {name!r}; known names: {', '.join(list_qconfigs())}"
        ) from None
    if not isinstance(entry, QConfig):
        entry = _REGISTRY[name] = entry()
    return entry


def list_qconfigs() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def resolve_qconfig(qconfig: object) -> QConfig:
    """The QConfig that `qconfig` stands for: a registered name, a QConfig (returned as it
    is) or a torch.ao.quantization.QConfig (adapted: triton_qat's classes in place of
    torch.ao's, quantize_input False). Anything else is a TypeError."""
    if isinstance(qconfig, QConfig):
        return qconfig
    if isinstance(qconfig, str):
        return get_qconfig(qconfig)
    ao = _torch_ao_quantization()
    if ao is not None and isinstance(qconfig, ao.QConfig):
        return _adapt_torch_ao_qconfig(qconfig, quantize_input=False)
    accepted = "a registered name (str), a triton_qat.QConfig"
    if ao is not None:
        accepted += " or a torch.ao.quantization.QConfig"
    raise TypeError(
        f"qconfig must be {accepted}; got {type(qconfig).__module__}.{type(qconfig).__qualname__}"
    )


# ---------------------------------------------------------------------------------------------
# torch.ao


def _torch_ao_quantization() -> ModuleType | None:
    """torch.ao.quantization, or None where this torch lacks it. (`import torch` already
    imports it: the lookup costs nothing.)"""
    try:
        import torch.ao.quantization as ao
    except ImportError:
        return None
    return ao


def _unwrap_factory(factory: object) -> tuple[type, tuple, dict[str, Any]] | None:
    """(class, args, keywords) of a class, a functools.partial of one or a torch.ao
    `with_args` factory (nested ones flattened); None for anything else, and for torch.ao
    factories with `with_callable_args` arguments other than factory_kwargs (evaluated per
    call: left as they are)."""
    if isinstance(factory, type):
        return factory, (), {}
    if isinstance(factory, functools.partial):
        inner = _unwrap_factory(factory.func)
        if inner is None:
            return None
        cls, args, keywords = inner
        # partial(f, **k)(**more) calls f(**k, **more): the outer keywords win.
        return cls, args + factory.args, {**keywords, **factory.keywords}
    partial = getattr(factory, "p", None)
    if isinstance(partial, functools.partial) and hasattr(factory, "callable_args"):
        # torch.ao's prepare adds factory_kwargs (the module's device) as a callable
        # argument; triton_qat's Linear places its fake quants on the weight's device itself.
        if set(factory.callable_args) - {"factory_kwargs"}:  # type: ignore[attr-defined]
            return None
        return _unwrap_factory(partial)
    return None


def _triton_qat_twin(cls: type) -> type | None:
    """triton_qat's class of the same name as torch.ao's `cls`; None for other classes."""
    if not cls.__module__.startswith(_TORCH_AO_PACKAGE):
        return None
    twin = getattr(quantizers, cls.__name__, None)
    return twin if isinstance(twin, type) else None


def _with_args(cls: type, **keywords: Any) -> Factory:
    """`cls.with_args(**keywords)` where cls has it (fake quants), else a functools.partial."""
    with_args = getattr(cls, "with_args", None)
    if with_args is not None:
        return with_args(**keywords)
    return functools.partial(cls, **keywords)


def _adapt_factory(factory: Any) -> Any:
    """triton_qat's twin of a torch.ao factory: same class name, same keyword arguments
    (observer factories among them adapted too; float-qparams embedding fake quants
    included). Returned unchanged: a factory without a twin, and one with a torch.ao factory
    argument that cannot be adapted (its module is then all torch.ao's)."""
    if factory is None:
        return None
    unwrapped = _unwrap_factory(factory)
    if unwrapped is None:
        return factory
    cls, args, keywords = unwrapped
    twin = _triton_qat_twin(cls)
    if twin is None:
        return factory
    adapted = {}
    for key, value in keywords.items():
        inner = _unwrap_factory(value) if callable(value) else None
        if inner is not None and inner[0].__module__.startswith(_TORCH_AO_PACKAGE):
            new_value = _adapt_factory(value)
            if new_value is value:
                # e.g. a torch.ao HistogramObserver inside a FakeQuantize: keep torch.ao's
                # module whole rather than mixing the two packages' classes in one.
                return factory
            value = new_value
        adapted[key] = value
    if isinstance(factory, type):
        return twin
    if args:
        return functools.partial(twin, *args, **adapted)
    return _with_args(twin, **adapted)


def _adapt_torch_ao_qconfig(ao_qconfig: Any, *, quantize_input: bool) -> QConfig:
    return QConfig(
        weight=_adapt_factory(ao_qconfig.weight),
        activation=_adapt_factory(ao_qconfig.activation),
        quantize_input=quantize_input,
    )


def get_default_qat_qconfig(backend: str = "x86", version: int = 1) -> QConfig:
    """triton_qat's twin of torch.ao.quantization.get_default_qat_qconfig(backend, version).

    backend: "x86", "fbgemm", "qnnpack" or "onednn"; version 0 (FakeQuantize) or 1
    (FusedMovingAvgObsFakeQuantize, torch.ao's default). The modules are triton_qat's, with
    torch.ao's arguments; the activation fake-quantizes the layer input (quantize_input True).
    Built from torch.ao's qconfig when torch.ao is installed, from the same arguments
    written here otherwise.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if isinstance(version, bool) or version not in (0, 1):
        raise ValueError(f"version must be 0 or 1, got {version!r}")
    ao = _torch_ao_quantization()
    if ao is not None:
        return _adapt_torch_ao_qconfig(
            ao.get_default_qat_qconfig(backend, version), quantize_input=True
        )
    return _default_qat_qconfig_without_torch_ao(backend, version)


def _default_qat_qconfig_without_torch_ao(backend: str, version: int) -> QConfig:
    """torch.ao's get_default_qat_qconfig, its arguments copied from torch 2.13's
    torch/ao/quantization/{qconfig,fake_quantize}.py (tests compare both ways)."""
    fq = quantizers
    fake_quant = fq.FakeQuantize if version == 0 else fq.FusedMovingAvgObsFakeQuantize
    activation_kwargs: dict[str, Any] = {}
    if backend in ("x86", "fbgemm"):
        activation_kwargs["reduce_range"] = True
    elif backend == "qnnpack":
        activation_kwargs["reduce_range"] = False
    activation = _with_args(
        fake_quant,
        observer=fq.MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        **activation_kwargs,
    )
    # default_{,fused_}{per_channel_,}w{eigh,}t_fake_quant: version 0 also passes
    # reduce_range=False (and ch_axis=0 per channel), version 1 leaves both at their defaults.
    weight_kwargs: dict[str, Any] = {"reduce_range": False} if version == 0 else {}
    if backend == "qnnpack":
        weight = _with_args(
            fake_quant,
            observer=fq.MovingAverageMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
            **weight_kwargs,
        )
    else:
        if version == 0:
            weight_kwargs["ch_axis"] = 0
        weight = _with_args(
            fake_quant,
            observer=fq.MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            **weight_kwargs,
        )
    return QConfig(weight=weight, activation=activation, quantize_input=True)


# ---------------------------------------------------------------------------------------------
# Built-in presets


def _int8_per_channel() -> QConfig:
    fq = quantizers
    return QConfig(weight=_int8_per_channel_weight(fq))


def _int8_per_channel_weight(fq: ModuleType) -> Factory:
    # Running min / max over every weight observed, as torch.ao's PerChannelMinMaxObserver.
    return fq.FakeQuantize.with_args(
        observer=fq.PerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )


def _int8_per_tensor() -> QConfig:
    fq = quantizers
    # Running min / max over every weight observed, as torch.ao's MinMaxObserver.
    weight = fq.FakeQuantize.with_args(
        observer=fq.MinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_tensor_symmetric,
    )
    return QConfig(weight=weight)


def _int4_per_group_weight(fq: ModuleType) -> Factory:
    # Groups of 32 along K (the last dim of the (N, K) weight); qparams of the current weight.
    return fq.FakeQuantize.with_args(
        observer=fq.PerGroupMinMaxObserver,
        quant_min=-8,
        quant_max=7,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        group_size=32,
    )


def _int4_per_group() -> QConfig:
    return QConfig(weight=_int4_per_group_weight(quantizers))


def _embedding_float_qparams(dtype: torch.dtype) -> QConfig:
    # torch.ao's default_embedding_qat_qconfig(_4bit) weight: per row, float zero point
    # -min / scale over the row's [min, max], qparams of the current table.
    fq = quantizers
    weight = fq.FakeQuantize.with_args(
        observer=fq.MovingAveragePerChannelMinMaxObserver,
        qscheme=torch.per_channel_affine_float_qparams,
        dtype=dtype,
        ch_axis=0,
        averaging_constant=1,
    )
    return QConfig(weight=weight)


def _per_token_int8(fq: ModuleType, qscheme: torch.qscheme) -> Factory:
    return functools.partial(
        fq.DynamicPerTokenFakeQuantize,
        dtype=torch.qint8,
        qscheme=qscheme,
        quant_min=-128,
        quant_max=127,
    )


def _w8a8_dynamic() -> QConfig:
    # int8 per-channel weights; each input token fake-quantized with its own int8 symmetric
    # qparams (torchao's int8 dynamic-activation recipe).
    fq = quantizers
    return QConfig(
        weight=_int8_per_channel_weight(fq),
        activation=_per_token_int8(fq, torch.per_tensor_symmetric),
    )


def _w4a8_dynamic() -> QConfig:
    # int4 per-group weights with int8 asymmetric per-token activations (torchao's 8da4w).
    fq = quantizers
    return QConfig(
        weight=_int4_per_group_weight(fq),
        activation=_per_token_int8(fq, torch.per_tensor_affine),
    )


def _fp8_weight() -> Factory:
    # float8_e4m3fn weights, one scale per output row (row amax / 448) of the current weight.
    return quantizers.Float8FakeQuantize.with_args(dtype=torch.float8_e4m3fn, granularity="per_row")


def _fp8_dynamic() -> QConfig:
    # FP8 weights per output row and FP8 activations with a dynamic scale per token (torchao's
    # Float8FakeQuantizeConfig(PerRow()) on both operands); tq.nn.Linear runs tq.fp8_linear.
    activation = quantizers.Float8FakeQuantize.with_args(
        dtype=torch.float8_e4m3fn, granularity="per_token"
    )
    return QConfig(weight=_fp8_weight(), activation=activation)


def _fp8_weight_only() -> QConfig:
    return QConfig(weight=_fp8_weight())


def _mx(fmt: str) -> Factory:
    # Blocks of 32 along K (the last dim of a weight (N, K) and of an activation (..., K)).
    return quantizers.MXFakeQuantize.with_args(fmt=fmt, block_size=32)


def _nvfp4() -> Factory:
    # Blocks of 16 along K; the fp32 tensor scale from the current tensor's amax (dynamic, for
    # the weight and each activation, as torchao's NVFP4FakeQuantizeConfig).
    return quantizers.NVFP4FakeQuantize.with_args(block_size=16, per_tensor_scale=True)


def _microscaling(make: Callable[[], Factory], weight_only: bool) -> QConfig:
    # Weights and activations in the format, or weights only; eager until the kernels land.
    return QConfig(weight=make(), activation=None if weight_only else make())


def learnable_qconfig(qconfig: object, *, use_grad_scaling: bool = True) -> QConfig:
    """The qconfig `qconfig` (a name, a QConfig or a torch.ao QConfig) with learnable qparams.

    Each (weight and activation) fake quant becomes a LearnableFakeQuantize with the same
    observer, range, dtype and qscheme: its scale and zero point are nn.Parameters, set by the
    observer on the first forward, then trained (init_from_observer; LSQ gradient scaling
    1 / sqrt(numel * quant_max) with use_grad_scaling). Dynamic per-token activations stay as
    they are (their qparams belong to each input); per-group weights are a ValueError.
    """
    base = resolve_qconfig(qconfig)
    return QConfig(
        weight=_learnable_factory(base.weight, use_grad_scaling, "weight"),
        activation=_learnable_factory(base.activation, use_grad_scaling, "activation"),
        quantize_input=base.quantize_input,
    )


def _learnable_factory(factory: Any, use_grad_scaling: bool, role: str) -> Any:
    if factory is None:
        return None
    fq = quantizers
    unwrapped = _unwrap_factory(factory)
    cls = None if unwrapped is None else unwrapped[0]
    kept_as_is = (fq.LearnableFakeQuantize, fq.DynamicPerTokenFakeQuantize)
    if cls is not None and issubclass(cls, kept_as_is):
        return factory
    if cls is None or not issubclass(cls, fq.FakeQuantize) or unwrapped[1]:  # type: ignore[index]
        raise TypeError(
            f"learnable_qconfig: the {role} factory must build a triton_qat FakeQuantize "
            f"(with keyword arguments), got {factory!r}"
        )
    keywords = dict(unwrapped[2])  # type: ignore[index]
    # One module built to read what the keywords leave to defaults (observer, range).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its reduce_range warning: the range is passed on
        probe = factory()
    if probe.group_size is not None:
        raise ValueError(f"learnable_qconfig: per-group {role} qparams cannot be learned")
    observer = keywords.pop("observer", type(probe.activation_post_process))
    # The range goes to the observer explicitly: reduce_range has been applied to it already.
    for key in ("quant_min", "quant_max", "is_dynamic", "reduce_range"):
        keywords.pop(key, None)
    return fq.LearnableFakeQuantize.with_args(
        observer=observer,
        quant_min=probe.activation_post_process.quant_min,
        quant_max=probe.activation_post_process.quant_max,
        use_grad_scaling=use_grad_scaling,
        init_from_observer=True,
        **keywords,
    )


_PRESETS: dict[str, Callable[[], QConfig]] = {
    "int8_per_channel": _int8_per_channel,
    "int8_per_tensor": _int8_per_tensor,
    "int4_per_group": _int4_per_group,
    # Embedding tables as torch.ao's default_embedding_qat_qconfig(_4bit): float qparams per row.
    "embedding_int8": functools.partial(_embedding_float_qparams, torch.quint8),
    "embedding_int4": functools.partial(_embedding_float_qparams, torch.quint4x2),
    "w8a8_dynamic": _w8a8_dynamic,
    "w4a8_dynamic": _w4a8_dynamic,
    # int8 per-channel symmetric weights whose scales are learned (LSQ), observer-initialised.
    "int8_per_channel_lsq": lambda: learnable_qconfig(_int8_per_channel()),
    # Float formats (shared/API.md, "Float formats"); FP8 e4m3fn, eager for now.
    "fp8_dynamic": _fp8_dynamic,
    "fp8_weight_only": _fp8_weight_only,
    # Microscaling (numerics/microscaling.py): MXFP8 (e4m3) and MXFP4 (e2m1) with e8m0 scales
    # per block of 32, NVFP4 (e2m1, e4m3 scales per block of 16, fp32 tensor scale).
    "mxfp8_dynamic": functools.partial(_microscaling, functools.partial(_mx, "mxfp8"), False),
    "mxfp8_weight_only": functools.partial(_microscaling, functools.partial(_mx, "mxfp8"), True),
    "mxfp4_dynamic": functools.partial(_microscaling, functools.partial(_mx, "mxfp4"), False),
    "mxfp4_weight_only": functools.partial(_microscaling, functools.partial(_mx, "mxfp4"), True),
    "nvfp4_dynamic": functools.partial(_microscaling, _nvfp4, False),
    "nvfp4_weight_only": functools.partial(_microscaling, _nvfp4, True),
    **{backend: functools.partial(get_default_qat_qconfig, backend) for backend in _BACKENDS},
}
_REGISTRY.update(_PRESETS)
