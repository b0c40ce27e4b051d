"""The qconfig registry, its presets, and the adaptation of torch.ao QConfigs."""

from __future__ import annotations

import dataclasses
import functools
import sys

import pytest
import torch

import triton_qat.qconfig as qc
from triton_qat import quantizers as tq_fake_quantize
from triton_qat.qconfig import (
    QConfig,
    get_default_qat_qconfig,
    get_qconfig,
    list_qconfigs,
    register_qconfig,
    resolve_qconfig,
)

# torch.ao's own reduce_range deprecation warning, which triton_qat's observers repeat.
pytestmark = pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max:UserWarning")

ao = qc._torch_ao_quantization()
needs_torch_ao = pytest.mark.skipif(ao is None, reason="torch.ao.quantization is not installed")

BUILTIN = (
    "int8_per_channel",
    "int8_per_tensor",
    "int4_per_group",
    "w8a8_dynamic",
    "fp8_dynamic",
    "fp8_weight_only",
    "mxfp8_dynamic",
    "mxfp8_weight_only",
    "mxfp4_dynamic",
    "mxfp4_weight_only",
    "nvfp4_dynamic",
    "nvfp4_weight_only",
    "x86",
    "fbgemm",
    "qnnpack",
)
BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: names registered by a test leave no trace."""
    monkeypatch.setattr(qc, "_REGISTRY", dict(qc._REGISTRY))


@pytest.fixture
def without_torch_ao(monkeypatch):
    """`import torch.ao.quantization` fails (as where torch.ao is missing); fresh presets."""
    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)
    monkeypatch.setattr(qc, "_REGISTRY", dict(qc._PRESETS))
    assert qc._torch_ao_quantization() is None


def weight_only() -> QConfig:
    return QConfig(weight=torch.nn.Identity)


def constructor_state(fake_quant: torch.nn.Module) -> dict:
    """What a fake-quant module was built with, in terms both packages share."""
    # A dynamic fake quant (per token) has no observer: its own attributes say it all.
    observer = getattr(fake_quant, "activation_post_process", fake_quant)
    state = {"class": type(fake_quant).__name__, "observer": type(observer).__name__}
    for owner, obj in (("", fake_quant), ("observer.", observer)):
        for name in (
            "quant_min",
            "quant_max",
            "dtype",
            "qscheme",
            "ch_axis",
            "is_dynamic",
            "averaging_constant",
            "reduce_range",
            "eps",
        ):
            value = getattr(obj, name, None)
            state[owner + name] = value.tolist() if isinstance(value, torch.Tensor) else value
    state["state_dict"] = {k: tuple(v.shape) for k, v in fake_quant.state_dict().items()}
    return state


def assert_triton_qat_module(module: torch.nn.Module) -> None:
    assert isinstance(module, tq_fake_quantize.FakeQuantizeBase), type(module)
    assert type(module).__module__.startswith(tq_fake_quantize.__name__ + ".")
    observer = getattr(module, "activation_post_process", module)  # dynamic: no observer
    assert type(observer).__module__.startswith(tq_fake_quantize.__name__ + ".")


# ---------------------------------------------------------------------------------------------
# Registry


def test_builtin_names_are_listed_sorted():
    names = list_qconfigs()
    assert names == sorted(names)
    assert set(BUILTIN) <= set(names)
    names.append("not registered")  # a copy: the registry is untouched
    assert "not registered" not in list_qconfigs()


def test_register_get_duplicate_and_overwrite(registry):
    first, second = weight_only(), QConfig(weight=torch.nn.Identity, quantize_input=False)
    register_qconfig("mine", first)
    assert get_qconfig("mine") is first
    assert resolve_qconfig("mine") is first
    assert "mine" in list_qconfigs()
    with pytest.raises(ValueError, match="'mine' is already registered"):
        register_qconfig("mine", second)
    with pytest.raises(ValueError, match="already registered"):
        register_qconfig("int8_per_channel", second)
    assert get_qconfig("mine") is first
    register_qconfig("mine", second, overwrite=True)
    assert get_qconfig("mine") is second
    register_qconfig("x86", second, overwrite=True)
    assert get_qconfig("x86") is second


def test_unknown_name_is_a_key_error_listing_known_names():
    with pytest.raises(KeyError, match="nope") as info:
        get_qconfig("nope")
    assert all(name in str(info.value) for name in BUILTIN)
    with pytest.raises(KeyError, match="int8_per_channel"):
        resolve_qconfig("nope")


def test_bad_types_name_the_argument():
    with pytest.raises(TypeError, match="name must be a str"):
        register_qconfig(1, weight_only())
    with pytest.raises(TypeError, match=r"qconfig must be a triton_qat\.QConfig"):
        register_qconfig("bad", {"weight": torch.nn.Identity})
    with pytest.raises(TypeError, match="name must be a str"):
        get_qconfig(None)
    with pytest.raises(TypeError, match=r"qconfig must be a registered name \(str\), a tri"):
        resolve_qconfig(3)
    with pytest.raises(TypeError, match="weight must be a callable factory"):
        QConfig(weight=None)
    with pytest.raises(TypeError, match=r"weight must be a factory .* Identity instance"):
        QConfig(weight=torch.nn.Identity())
    with pytest.raises(TypeError, match="activation must be a callable factory or None"):
        QConfig(weight=torch.nn.Identity, activation="x86")
    with pytest.raises(TypeError, match="quantize_input must be a bool"):
        QConfig(weight=torch.nn.Identity, quantize_input=1)


def test_qconfig_is_frozen_and_resolves_to_itself():
    qconfig = weight_only()
    assert qconfig.activation is None and qconfig.quantize_input is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        qconfig.quantize_input = False
    assert resolve_qconfig(qconfig) is qconfig


@needs_torch_ao
def test_resolve_names_torch_ao_in_the_type_error():
    with pytest.raises(TypeError, match=r"or a torch\.ao\.quantization\.QConfig; got builtins.int"):
        resolve_qconfig(3)


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", BUILTIN)
def test_every_preset_builds_triton_qat_modules(name):
    qconfig = get_qconfig(name)
    assert get_qconfig(name) is qconfig  # built once
    assert_triton_qat_module(qconfig.weight())
    if qconfig.activation is not None:
        assert qconfig.quantize_input
        assert_triton_qat_module(qconfig.activation())


@pytest.mark.parametrize(
    ("name", "granularity", "quant_range", "group_size"),
    [
        ("int8_per_channel", "per_channel", (-128, 127), None),
        ("w8a8_dynamic", "per_channel", (-128, 127), None),
        ("int8_per_tensor", "per_tensor", (-128, 127), None),
        ("int4_per_group", "per_group", (-8, 7), 32),
    ],
)
def test_weight_presets_give_symmetric_qparams(name, granularity, quant_range, group_size):
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    fake_quant = get_qconfig(name).weight()
    fake_quant.observe(weight)
    qparams = fake_quant.qparams()
    assert qparams.granularity == granularity
    assert (qparams.quant_min, qparams.quant_max) == quant_range
    assert qparams.group_size == group_size
    if granularity == "per_channel":
        assert qparams.axis in (0, -2)
    assert torch.all(torch.as_tensor(qparams.zero_point) == 0)


@needs_torch_ao
@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_qconfigs_match_torch_ao(backend, version):
    ours = get_default_qat_qconfig(backend, version)
    theirs = ao.get_default_qat_qconfig(backend, version)
    assert ours.quantize_input
    for role in ("weight", "activation"):
        module = getattr(ours, role)()
        assert_triton_qat_module(module)
        assert constructor_state(module) == constructor_state(getattr(theirs, role)())
    if version == 1 and backend != "onednn":
        preset = get_qconfig(backend)
        for role in ("weight", "activation"):
            assert constructor_state(getattr(preset, role)()) == constructor_state(
                getattr(ours, role)()
            )


def test_default_qat_qconfig_rejects_unknown_backend_and_version():
    with pytest.raises(ValueError, match="backend must be one of"):
        get_default_qat_qconfig("arm")
    with pytest.raises(ValueError, match="version must be 0 or 1"):
        get_default_qat_qconfig("x86", 2)


@needs_torch_ao
def test_presets_without_torch_ao_equal_those_with_it(without_torch_ao, monkeypatch):
    built = {
        (backend, version): get_default_qat_qconfig(backend, version)
        for backend in BACKENDS
        for version in (0, 1)
    }
    presets = {name: get_qconfig(name) for name in BUILTIN}
    with pytest.raises(TypeError, match=r"a triton_qat\.QConfig; got builtins\.object"):
        resolve_qconfig(object())
    monkeypatch.undo()
    assert qc._torch_ao_quantization() is ao
    for (backend, version), qconfig in built.items():
        theirs = ao.get_default_qat_qconfig(backend, version)
        adapted = get_default_qat_qconfig(backend, version)
        for role in ("weight", "activation"):
            # The same class with the same arguments, whichever path built the factory.
            spec = qc._unwrap_factory(getattr(qconfig, role))
            assert spec == qc._unwrap_factory(getattr(adapted, role))
            module = getattr(qconfig, role)()
            assert_triton_qat_module(module)
            assert constructor_state(module) == constructor_state(getattr(theirs, role)())
    for name, qconfig in presets.items():
        with_ao = get_qconfig(name)
        assert qconfig.quantize_input == with_ao.quantize_input
        assert (qconfig.activation is None) == (with_ao.activation is None)
        assert constructor_state(qconfig.weight()) == constructor_state(with_ao.weight())
        if qconfig.activation is not None:
            assert constructor_state(qconfig.activation()) == constructor_state(
                with_ao.activation()
            )


# ---------------------------------------------------------------------------------------------
# Adapting torch.ao QConfigs


@needs_torch_ao
def test_torch_ao_qconfig_is_adapted_without_input_fake_quant():
    theirs = ao.get_default_qat_qconfig("fbgemm")
    ours = resolve_qconfig(theirs)
    assert isinstance(ours, QConfig)
    assert not ours.quantize_input  # drop-in for torch.ao.nn.qat.Linear
    for role in ("weight", "activation"):
        module = getattr(ours, role)()
        assert_triton_qat_module(module)
        assert constructor_state(module) == constructor_state(getattr(theirs, role)())


@needs_torch_ao
def test_nested_with_args_are_flattened():
    observer = ao.MovingAverageMinMaxObserver.with_args(averaging_constant=0.5, eps=2**-12)
    factory = ao.FakeQuantize.with_args(observer=observer, quant_min=0, quant_max=255)
    factory = factory.with_args(quant_max=127, reduce_range=False)
    theirs = ao.QConfig(activation=factory, weight=ao.default_weight_fake_quant)
    ours = resolve_qconfig(theirs)
    for role in ("weight", "activation"):
        module = getattr(ours, role)()
        assert_triton_qat_module(module)
        assert constructor_state(module) == constructor_state(getattr(theirs, role)())
    assert ours.activation().activation_post_process.averaging_constant == 0.5


class CustomFakeQuantize(torch.nn.Module):
    def forward(self, x):
        return x


@needs_torch_ao
def test_factories_without_a_twin_are_kept():
    custom = functools.partial(CustomFakeQuantize)
    histogram = ao.FakeQuantize.with_args(observer=ao.HistogramObserver, quant_min=0, quant_max=255)
    ours_already = get_qconfig("int8_per_channel").weight
    callable_args = ao.FakeQuantize.with_args(quant_min=0, quant_max=255).with_callable_args(
        observer=lambda: ao.MovingAverageMinMaxObserver
    )
    kept = (CustomFakeQuantize, torch.nn.Identity, histogram, callable_args)
    for activation in (*kept, ours_already):
        ours = resolve_qconfig(ao.QConfig(activation=activation, weight=custom))
        assert ours.weight is custom
        assert ours.activation is activation
    assert isinstance(ours.weight(), CustomFakeQuantize)
