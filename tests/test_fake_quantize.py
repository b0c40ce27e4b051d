"""Observers and fake-quantize modules (triton_qat.quantizers) against torch.ao on the CPU.

torch.ao.quantization is the oracle: for every observer and both fake-quant classes, over
several steps of drifting inputs (all-positive, all-negative, constant and zero tensors
included), buffers, calculate_qparams(), outputs, straight-through gradients and state_dicts
must be equal bit for bit; checkpoints load both ways. FusedMovingAvgObsFakeQuantize runs with
the arguments of torch.ao's default QAT qconfigs against torch.fused_moving_avg_obs_fake_quant.
Half-precision inputs are compared with torch.ao on the fp32 cast. The modules under test run
on the `device` fixture (see conftest); torch.ao always runs on the CPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from _compare import assert_bitwise_equal
from torch import Tensor, nn

import triton_qat as tq
import triton_qat.quantizers as tqfq
from triton_qat.numerics.observer_formulas import fused_qparams
from triton_qat.numerics.qparams import QParams

try:
    import torch.ao.quantization as ao
except ImportError:  # the oracle tests skip; the module itself must still work
    ao = None

needs_ao = pytest.mark.skipif(ao is None, reason="torch.ao.quantization is not installed")

HALF_DTYPES = [torch.bfloat16, torch.float16]

# --- inputs ----------------------------------------------------------------------------------

# Distributions drift from step to step; degenerate tensors come first in the second sequence
# (the first observation of a moving average and the fused op's isinf test start from them).
SEQUENCES = {
    "drift": ["normal", "shifted", "positive", "negative", "constant", "zeros", "mixed", "wide"],
    "degenerate_first": ["zeros", "constant", "positive", "normal", "negative", "tiny", "mixed"],
}


def _make_input(kind: str, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    r = torch.randn(shape, generator=g)
    if kind == "normal":
        return r
    if kind == "shifted":
        return r * 3.0 + 1.5
    if kind == "positive":
        return r.abs() + 0.25
    if kind == "negative":
        return -r.abs() - 0.5
    if kind == "constant":
        return torch.full(shape, 0.7)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "tiny":  # scales below 6.1e-5: the fused op's small-scale cutoff
        return r * 1e-4
    if kind == "wide":
        return r * 40.0 - 3.0
    if kind == "mixed":
        # Every regime at once along dim 0 and the last dim (channels differ per axis).
        lead = torch.arange(shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
        last = torch.arange(shape[-1]).float()
        out = r * (2.0 ** (last % 5 - 2))
        out = torch.where(lead % 4 == 0, out.abs() + 0.1, out)
        out = torch.where(lead % 4 == 1, -out.abs() - 0.1, out)
        return torch.where(lead % 4 == 2, torch.full_like(out, -1.25), out)
    raise ValueError(kind)


def _steps(shape: tuple[int, ...], seq: str, seed: int = 0) -> Iterator[Tensor]:
    g = torch.Generator().manual_seed(seed)
    for kind in SEQUENCES[seq]:
        yield _make_input(kind, shape, g)


# --- comparisons -----------------------------------------------------------------------------


def _assert_same_state(ours: nn.Module, theirs: nn.Module, what: str) -> None:
    """Same state_dict keys in the same order, same versions, values equal bit for bit."""
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert list(sd_o) == list(sd_t), f"{what}: keys {list(sd_o)} != {list(sd_t)}"
    for key, value in sd_t.items():
        assert_bitwise_equal(sd_o[key].cpu(), value, f"{what}: {key}")
    for prefix, meta in sd_t._metadata.items():
        assert sd_o._metadata[prefix].get("version") == meta.get("version"), (what, prefix)


def _assert_same_qparams(ours: tuple[Tensor, Tensor], theirs: tuple[Tensor, Tensor], what: str):
    assert_bitwise_equal(ours[0].cpu(), theirs[0], f"{what}: scale")
    assert_bitwise_equal(ours[1].cpu(), theirs[1], f"{what}: zero_point")


def _quiet(fn: Callable, *args):
    """Call fn, ignoring torch.ao's deprecation / not-yet-observed warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


# --- observers -------------------------------------------------------------------------------

SYM_T, AFF_T = torch.per_tensor_symmetric, torch.per_tensor_affine
SYM_C, AFF_C = torch.per_channel_symmetric, torch.per_channel_affine

OBSERVER_CASES = [
    ("MinMaxObserver", {}),
    ("MinMaxObserver", {"dtype": torch.qint8, "qscheme": SYM_T}),
    ("MinMaxObserver", {"dtype": torch.quint8, "qscheme": SYM_T}),
    ("MinMaxObserver", {"reduce_range": True}),
    ("MinMaxObserver", {"dtype": torch.qint8, "qscheme": SYM_T, "quant_min": -8, "quant_max": 7}),
    ("MinMaxObserver", {"dtype": torch.quint8, "qscheme": SYM_T, "quant_min": 0, "quant_max": 15}),
    ("MinMaxObserver", {"dtype": torch.quint4x2}),
    (
        "MinMaxObserver",
        {"dtype": torch.qint8, "quant_min": -128, "quant_max": 127, "reduce_range": True},
    ),
    ("MovingAverageMinMaxObserver", {}),
    (
        "MovingAverageMinMaxObserver",
        {"averaging_constant": 0.3, "dtype": torch.qint8, "qscheme": SYM_T, "eps": 2**-12},
    ),
    ("MovingAverageMinMaxObserver", {"quant_min": 0, "quant_max": 255, "reduce_range": True}),
    ("PerChannelMinMaxObserver", {}),
    ("PerChannelMinMaxObserver", {"ch_axis": 1, "dtype": torch.qint8, "qscheme": SYM_C}),
    (
        "PerChannelMinMaxObserver",
        {"ch_axis": -1, "dtype": torch.quint8, "qscheme": SYM_C, "quant_min": 0, "quant_max": 15},
    ),
    ("MovingAveragePerChannelMinMaxObserver", {"dtype": torch.qint8, "qscheme": SYM_C}),
    (
        "MovingAveragePerChannelMinMaxObserver",
        {"averaging_constant": 0.2, "ch_axis": 1, "dtype": torch.qint8, "quant_min": -8,
         "quant_max": 7},
    ),
]  # fmt: skip


def _case_id(case: tuple[str, dict]) -> str:
    name, kwargs = case
    parts = [name.replace("Observer", "")]
    for key, value in kwargs.items():
        parts.append(f"{key}={str(value).replace('torch.', '')}")
    return "-".join(parts)


@needs_ao
@pytest.mark.parametrize("seq", sorted(SEQUENCES))
@pytest.mark.parametrize("case", OBSERVER_CASES, ids=_case_id)
def test_observer_matches_torch_ao(case, seq, device):
    name, kwargs = case
    ours = _quiet(lambda: getattr(tqfq, name)(**kwargs))
    theirs = _quiet(lambda: getattr(ao, name)(**kwargs))
    ours.to(device)
    assert (ours.quant_min, ours.quant_max) == (theirs.quant_min, theirs.quant_max)
    assert ours.has_customized_qrange == theirs.has_customized_qrange
    _assert_same_state(ours, theirs, "initial")
    # Not yet observed: both warn and return the defaults (1.0, 0), same dtypes.
    with pytest.warns(UserWarning, match="must run observer"):
        q_ours = ours.calculate_qparams()
    with pytest.warns(UserWarning, match="must run observer"):
        q_theirs = theirs.calculate_qparams()
    _assert_same_qparams(q_ours, q_theirs, "initial")
    for step, x in enumerate(_steps((5, 7, 3), seq)):
        x_dev = x.to(device)
        assert ours(x_dev) is x_dev
        theirs(x)
        _assert_same_state(ours, theirs, f"step {step}")
        _assert_same_qparams(ours.calculate_qparams(), theirs.calculate_qparams(), f"step {step}")


@needs_ao
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(
    "case", [c for c in OBSERVER_CASES if "averaging_constant" in c[1]], ids=_case_id
)
def test_observer_half_inputs(case, dtype, device):
    """fp16 / bf16 inputs: statistics in fp32, as torch.ao's observers take them."""
    name, kwargs = case
    ours = getattr(tqfq, name)(**kwargs).to(device)
    theirs = getattr(ao, name)(**kwargs)
    for step, x in enumerate(_steps((4, 6, 5), "drift", seed=3)):
        xh = x.to(dtype)
        ours(xh.to(device))
        theirs(xh)
        _assert_same_state(ours, theirs, f"{dtype} step {step}")
        _assert_same_qparams(ours.calculate_qparams(), theirs.calculate_qparams(), f"step {step}")


@needs_ao
def test_observer_load_state_dict_both_ways(device):
    """Per-channel buffers start empty; checkpoints of either library load into the other."""
    kwargs = {"dtype": torch.qint8, "qscheme": SYM_C, "ch_axis": 1}
    for name in ("PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"):
        ours, theirs = getattr(tqfq, name)(**kwargs).to(device), getattr(ao, name)(**kwargs)
        ours.load_state_dict(theirs.state_dict())  # empty into empty
        theirs.load_state_dict(ours.state_dict())
        _assert_same_state(ours, theirs, f"{name} empty")
        x = torch.randn(3, 6, 2)
        ours(x.to(device))
        fresh = getattr(ao, name)(**kwargs)
        fresh.load_state_dict(ours.state_dict())
        _assert_same_state(ours, fresh, f"{name} ours -> torch.ao")
        theirs(x * 2)
        fresh_ours = getattr(tqfq, name)(**kwargs).to(device)
        fresh_ours.load_state_dict(theirs.state_dict())
        _assert_same_state(fresh_ours, theirs, f"{name} torch.ao -> ours")
        x2 = torch.randn(3, 6, 2) - 1
        fresh_ours(x2.to(device))
        theirs(x2)
        _assert_same_state(fresh_ours, theirs, f"{name} after loading")


@pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max")
def test_observer_argument_checks():
    with pytest.raises(NotImplementedError, match="qscheme"):
        tqfq.MinMaxObserver(qscheme=SYM_C)
    with pytest.raises(NotImplementedError, match="qscheme"):
        tqfq.PerChannelMinMaxObserver(qscheme=AFF_T)
    with pytest.raises(NotImplementedError, match="qscheme"):
        tqfq.PerChannelMinMaxObserver(qscheme=AFF_T)
    with pytest.raises(NotImplementedError, match="reduce range"):
        tqfq.MinMaxObserver(dtype=torch.quint8, qscheme=SYM_T, reduce_range=True)
    with pytest.raises(ValueError, match="include 0"):
        tqfq.MinMaxObserver(quant_min=1, quant_max=7)
    with pytest.raises(ValueError, match="dtype"):
        tqfq.MinMaxObserver(dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="dynamic"):
        tqfq.PerChannelMinMaxObserver(is_dynamic=True)
    with pytest.raises(ValueError, match="group_size"):
        tqfq.PerGroupMinMaxObserver(0)
    with pytest.raises(ValueError, match="does not divide"):
        tqfq.PerGroupMinMaxObserver(4)(torch.randn(3, 6))


# --- per-group observer ----------------------------------------------------------------------


@needs_ao
@pytest.mark.parametrize(
    "qscheme,dtype,qrange",
    [
        (SYM_C, torch.qint8, None),
        (SYM_C, torch.qint8, (-8, 7)),
        (AFF_C, torch.qint8, (-8, 7)),
        (AFF_C, torch.quint8, None),
        (SYM_C, torch.quint8, (0, 15)),
    ],
    ids=["sym-int8", "sym-int4", "affine-int4", "affine-uint8", "sym-uint4"],
)
@pytest.mark.parametrize("shape,group", [((6, 32), 8), ((2, 3, 12), 4), ((12,), 12)])
def test_per_group_observer_matches_per_channel_on_groups(qscheme, dtype, qrange, shape, group):
    """Each group is a channel of x.reshape(-1, group) for torch.ao's per-channel observer;
    only the last observation counts."""
    qmin, qmax = qrange or (None, None)
    ours = tqfq.PerGroupMinMaxObserver(
        group, dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax
    )
    expected_shape = (*shape[:-1], shape[-1] // group)
    for step, x in enumerate(_steps(shape, "drift", seed=11)):
        assert ours(x) is x
        ref = ao.PerChannelMinMaxObserver(
            ch_axis=0, dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax
        )
        ref(x.reshape(-1, group))
        scale, zp = ours.calculate_qparams()
        ref_scale, ref_zp = ref.calculate_qparams()
        assert scale.shape == expected_shape and zp.dtype == torch.int32
        what = f"step {step}"
        assert_bitwise_equal(scale, ref_scale.reshape(expected_shape), f"{what}: scale")
        assert_bitwise_equal(zp, ref_zp.to(torch.int32).reshape(expected_shape), f"{what}: zp")
        assert_bitwise_equal(ours.min_val, ref.min_val.reshape(expected_shape), f"{what}: min")
        assert_bitwise_equal(ours.max_val, ref.max_val.reshape(expected_shape), f"{what}: max")


@needs_ao
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_fake_quantize_per_group_matches_torch_per_channel(dtype, device):
    """FakeQuantize with a PerGroupMinMaxObserver == torch's per-channel op on the groups."""
    g = 8
    fq = tqfq.FakeQuantize(
        observer=tqfq.PerGroupMinMaxObserver,
        group_size=g,
        quant_min=-8,
        quant_max=7,
        dtype=torch.qint8,
        qscheme=SYM_C,
    ).to(device)
    assert fq.group_size == g and not fq.is_per_channel and "group_size=8" in repr(fq)
    for step, x in enumerate(_steps((5, 24), "drift", seed=5)):
        xh = x.to(dtype)
        xo = xh.to(device, copy=True).requires_grad_()
        y = fq(xo)
        xt = xh.float().reshape(-1, g).clone().requires_grad_()
        scale, zp = fq.scale.cpu().reshape(-1), fq.zero_point.cpu().reshape(-1)
        yt = torch.fake_quantize_per_channel_affine(xt, scale, zp, 0, -8, 7)
        assert_bitwise_equal(y.cpu(), yt.reshape(x.shape).to(dtype), f"step {step}: output")
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(step)).to(dtype)
        y.backward(dy.to(device))
        yt.backward(dy.float().reshape(-1, g))
        assert_bitwise_equal(xo.grad.cpu(), xt.grad.reshape(x.shape).to(dtype), f"step {step}")


# --- FakeQuantize ----------------------------------------------------------------------------

FQ_CASES = [
    # torch.ao's default_fake_quant and default_weight_fake_quant
    ("MovingAverageMinMaxObserver",
     {"quant_min": 0, "quant_max": 255, "dtype": torch.quint8, "qscheme": AFF_T,
      "reduce_range": True}),
    ("MovingAverageMinMaxObserver",
     {"quant_min": -128, "quant_max": 127, "dtype": torch.qint8, "qscheme": SYM_T}),
    # default_per_channel_weight_fake_quant
    ("MovingAveragePerChannelMinMaxObserver",
     {"quant_min": -128, "quant_max": 127, "dtype": torch.qint8, "qscheme": SYM_C,
      "ch_axis": 0}),
    ("MovingAveragePerChannelMinMaxObserver",
     {"quant_min": -8, "quant_max": 7, "dtype": torch.qint8, "qscheme": AFF_C, "ch_axis": 1,
      "averaging_constant": 0.5}),
    ("MinMaxObserver", {"dtype": torch.quint8}),
    ("PerChannelMinMaxObserver", {"dtype": torch.qint8, "qscheme": SYM_C, "ch_axis": 2}),
    ("MovingAverageMinMaxObserver",
     {"quant_min": 0, "quant_max": 15, "dtype": torch.quint8, "qscheme": SYM_T}),
]  # fmt: skip

# (observer_enabled, fake_quant_enabled) per step, switched with torch.ao's apply() helpers.
SCHEDULE = [(1, 1), (1, 1), (1, 1), (1, 1), (0, 1), (0, 0), (1, 0), (1, 1), (1, 1)]


def _set_flags(models: list[nn.Module], observe: int, fake_quant: int) -> None:
    for model in models:
        model.apply(ao.enable_observer if observe else ao.disable_observer)
        model.apply(ao.enable_fake_quant if fake_quant else ao.disable_fake_quant)


def _build_fake_quantize(cls_name: str, observer_name: str, kwargs: dict):
    ours = _quiet(lambda: getattr(tqfq, cls_name)(observer=getattr(tqfq, observer_name), **kwargs))
    theirs = _quiet(lambda: getattr(ao, cls_name)(observer=getattr(ao, observer_name), **kwargs))
    return ours, theirs


def _run_parity(
    ours: nn.Module,
    theirs: nn.Module,
    shape: tuple[int, ...],
    seq: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    schedule: list[tuple[int, int]] | None = None,
) -> None:
    """Step both modules (ours on `device` in `dtype`, torch.ao on the CPU in fp32) and compare
    outputs, gradients, buffers and calculate_qparams() after every step."""
    ours.to(device)
    wrapped_ours, wrapped_theirs = nn.Sequential(ours), nn.Sequential(theirs)
    _assert_same_state(ours, theirs, "initial")
    for step, x in enumerate(_steps(shape, seq, seed=1)):
        if schedule is not None:
            _set_flags([wrapped_ours, wrapped_theirs], *schedule[step % len(schedule)])
        what = f"step {step} ({dtype})"
        xh = x.to(dtype)
        xo = xh.to(device, copy=True).requires_grad_()
        xt = xh.float().clone().requires_grad_()
        y_ours = wrapped_ours(xo)
        y_theirs = wrapped_theirs(xt)
        assert y_ours.dtype == dtype
        assert_bitwise_equal(y_ours.cpu(), y_theirs.to(dtype), f"{what}: output")
        dy = torch.randn(shape, generator=torch.Generator().manual_seed(100 + step)).to(dtype)
        y_ours.backward(dy.to(device))
        y_theirs.backward(dy.float())
        assert_bitwise_equal(xo.grad.cpu(), xt.grad.to(dtype), f"{what}: gradient")
        _assert_same_state(ours, theirs, what)
        _assert_same_qparams(_quiet(ours.calculate_qparams), _quiet(theirs.calculate_qparams), what)


@needs_ao
@pytest.mark.parametrize("seq", sorted(SEQUENCES))
@pytest.mark.parametrize("case", FQ_CASES, ids=_case_id)
def test_fake_quantize_matches_torch_ao(case, seq, device):
    observer_name, kwargs = case
    ours, theirs = _build_fake_quantize("FakeQuantize", observer_name, kwargs)
    for attr in ("quant_min", "quant_max", "dtype", "qscheme", "ch_axis", "is_per_channel"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert isinstance(ours, ao.FakeQuantizeBase)
    with tq.use_backend("eager"):
        _run_parity(ours, theirs, (6, 5, 4), seq, device, schedule=SCHEDULE)


@needs_ao
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", FQ_CASES[:4], ids=_case_id)
def test_fake_quantize_half_inputs(case, dtype, device):
    """fp16 / bf16 inputs: torch.ao's result on the fp32 cast, cast back."""
    ours, theirs = _build_fake_quantize("FakeQuantize", *case)
    with tq.use_backend("eager"):
        _run_parity(ours, theirs, (6, 5, 4), "drift", device, dtype=dtype)


# --- FusedMovingAvgObsFakeQuantize -------------------------------------------------------------

# torch.ao's default QAT qconfigs (all fused in version 1) and its other fused presets.
AO_FACTORIES = {
    "x86-v1-act": lambda: ao.get_default_qat_qconfig("x86").activation,
    "x86-v1-weight": lambda: ao.get_default_qat_qconfig("x86").weight,
    "qnnpack-v1-act": lambda: ao.get_default_qat_qconfig("qnnpack", version=1).activation,
    "qnnpack-v1-weight": lambda: ao.get_default_qat_qconfig("qnnpack", version=1).weight,
    "qnnpack-v0-act": lambda: ao.get_default_qat_qconfig("qnnpack", version=0).activation,
    "qnnpack-v0-weight": lambda: ao.get_default_qat_qconfig("qnnpack", version=0).weight,
    "x86-v0-weight": lambda: ao.get_default_qat_qconfig("x86", version=0).weight,
    "symmetric-qnnpack-act": lambda: ao.default_symmetric_qnnpack_qat_qconfig.activation,
    "wt-neg127-127": lambda: ao.fake_quantize.fused_wt_fake_quant_range_neg_127_to_127,
    "per-channel-wt-neg127-127": (
        lambda: ao.fake_quantize.fused_per_channel_wt_fake_quant_range_neg_127_to_127
    ),
}


def _ours_from_ao_factory(factory) -> nn.Module:
    """Our module built with the class names and arguments of a torch.ao with_args factory."""
    kwargs = dict(factory.p.keywords)
    observer = kwargs.get("observer")
    if observer is not None:
        if hasattr(observer, "p"):
            kwargs["observer"] = getattr(tqfq, observer.p.func.__name__).with_args(
                **observer.p.keywords
            )
        else:
            kwargs["observer"] = getattr(tqfq, observer.__name__)
    return _quiet(lambda: getattr(tqfq, factory.p.func.__name__)(**kwargs))


def _shape_for(module: nn.Module) -> tuple[int, ...]:
    return (7, 12) if module.is_per_channel else (4, 6, 5)


@needs_ao
@pytest.mark.parametrize("seq", sorted(SEQUENCES))
@pytest.mark.parametrize("name", sorted(AO_FACTORIES))
def test_default_qat_fake_quants_match_torch_ao(name, seq, device):
    factory = AO_FACTORIES[name]()
    theirs = _quiet(factory)
    ours = _ours_from_ao_factory(factory)
    assert type(ours).__name__ == type(theirs).__name__
    assert isinstance(ours, ao.FakeQuantizeBase)
    with tq.use_backend("eager"):
        _run_parity(ours, theirs, _shape_for(theirs), seq, device, schedule=SCHEDULE)


@needs_ao
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", ["x86-v1-act", "x86-v1-weight", "qnnpack-v1-weight"])
def test_fused_half_inputs(name, dtype, device):
    """torch's fused CPU op refuses bf16; ours takes statistics in fp32 and keeps the dtype."""
    factory = AO_FACTORIES[name]()
    theirs = _quiet(factory)
    ours = _ours_from_ao_factory(factory)
    with tq.use_backend("eager"):
        _run_parity(ours, theirs, _shape_for(theirs), "drift", device, dtype=dtype)


@needs_ao
@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "symmetric"])
@pytest.mark.parametrize(
    "qrange",
    [(-128, 127), (0, 255), (-8, 7), (-3, 4), (-1000, 3000), (0, 2**20), (-(2**20), 2**20 - 1)],
)
def test_fused_qparams_match_torch_op(qrange, symmetric):
    """ChooseQuantizationParams over many (min, max) pairs, tiny and wide, at the range ends
    of torch's op (the zero point and small-scale cutoff are where formulas differ)."""
    qmin, qmax = qrange
    g = torch.Generator().manual_seed(qmax)
    n = 4000
    a = torch.randn(n, generator=g) * 2.0 ** torch.randint(-30, 12, (n,), generator=g)
    b = torch.randn(n, generator=g) * 2.0 ** torch.randint(-30, 12, (n,), generator=g)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    kind = torch.arange(n) % 5
    lo = torch.where(kind == 0, torch.zeros_like(lo), lo)  # all non-negative
    hi = torch.where(kind == 1, torch.zeros_like(hi), hi)  # all non-positive
    hi = torch.where(kind == 2, lo, hi)  # constant
    scale, zp = fused_qparams(lo, hi, qmin, qmax, symmetric)
    ref_scale, ref_zp = torch.ones(n), torch.zeros(n, dtype=torch.int32)
    torch.fused_moving_avg_obs_fake_quant(
        torch.zeros(n, 1),
        torch.tensor([0]),
        torch.tensor([1]),
        lo.clone(),
        hi.clone(),
        ref_scale,
        ref_zp,
        0.01,
        qmin,
        qmax,
        0,
        True,
        symmetric,
    )
    assert_bitwise_equal(scale, ref_scale, "scale")
    assert_bitwise_equal(zp, ref_zp, "zero_point")


def test_fused_any_channel_axis():
    """torch's fused op takes channels on axis 0 only; ours along ch_axis, equal to axis 0 of
    the moved tensor."""
    kwargs = {"observer": tqfq.MovingAveragePerChannelMinMaxObserver, "quant_min": -128,
              "quant_max": 127, "dtype": torch.qint8, "qscheme": SYM_C}  # fmt: skip
    on_axis1 = tqfq.FusedMovingAvgObsFakeQuantize(ch_axis=1, **kwargs)
    on_axis0 = tqfq.FusedMovingAvgObsFakeQuantize(ch_axis=0, **kwargs)
    with tq.use_backend("eager"):
        for x in _steps((4, 6, 3), "drift"):
            y1 = on_axis1(x)
            y0 = on_axis0(x.transpose(0, 1).contiguous())
            assert_bitwise_equal(y1, y0.transpose(0, 1), "output")
            assert_bitwise_equal(on_axis1.scale, on_axis0.scale, "scale")


@needs_ao
@pytest.mark.parametrize(
    "cls_name,case",
    [
        ("FakeQuantize", FQ_CASES[0]),
        ("FusedMovingAvgObsFakeQuantize", FQ_CASES[1]),
        ("FusedMovingAvgObsFakeQuantize", FQ_CASES[2]),
    ],
    ids=["fq-per-tensor", "fused-per-tensor", "fused-per-channel"],
)
@pytest.mark.filterwarnings("ignore:must run observer")
def test_empty_input_matches_torch_ao(cls_name, case, device):
    """Nothing observed: the defaults stay (torch's fused op returns before its helper)."""
    ours, theirs = _build_fake_quantize(cls_name, *case)
    ours.to(device)
    x = torch.empty(0, 5)
    with tq.use_backend("eager"):
        assert ours(x.to(device)).shape == theirs(x).shape == (0, 5)
    _assert_same_state(ours, theirs, "empty input")
    y = torch.randn(4, 5)
    with tq.use_backend("eager"):
        assert_bitwise_equal(ours(y.to(device)).cpu(), theirs(y), "output after empty")
    _assert_same_state(ours, theirs, "after empty input")


# --- checkpoints, helpers, factories -----------------------------------------------------------

CHECKPOINT_CASES = {
    "fq-per-tensor": lambda: _build_fake_quantize("FakeQuantize", *FQ_CASES[0]),
    "fq-per-channel": lambda: _build_fake_quantize("FakeQuantize", *FQ_CASES[3]),
    "fused-per-tensor": lambda: _from_factory("x86-v1-act"),
    "fused-per-channel": lambda: _from_factory("x86-v1-weight"),
}


def _from_factory(name: str):
    factory = AO_FACTORIES[name]()
    return _ours_from_ao_factory(factory), _quiet(factory)


@needs_ao
@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_load_state_dict_both_ways(name, device):
    """Fresh (empty per-channel buffers) and trained checkpoints load across the libraries,
    and training continues identically after loading."""
    ours, theirs = CHECKPOINT_CASES[name]()
    ours.to(device)
    shape = (6, 5, 4) if not theirs.is_per_channel else (7, 12)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    _assert_same_state(ours, theirs, "fresh")
    with tq.use_backend("eager"):
        steps = list(_steps(shape, "drift", seed=2))
        for x in steps[:3]:
            ours(x.to(device))
        theirs_loaded = CHECKPOINT_CASES[name]()[1]
        theirs_loaded.load_state_dict(ours.state_dict())
        _assert_same_state(ours, theirs_loaded, "ours -> torch.ao")
        for x in steps[3:6]:
            theirs_loaded(x)
        ours_loaded = CHECKPOINT_CASES[name]()[0].to(device)
        ours_loaded.load_state_dict(theirs_loaded.state_dict())
        _assert_same_state(ours_loaded, theirs_loaded, "torch.ao -> ours")
        for x in steps[6:]:
            assert_bitwise_equal(ours_loaded(x.to(device)).cpu(), theirs_loaded(x), "output")
        _assert_same_state(ours_loaded, theirs_loaded, "after loading")


@needs_ao
def test_torch_ao_helpers_and_qconfig_accept_our_modules():
    model = nn.Sequential(
        tqfq.FakeQuantize(), tqfq.FusedMovingAvgObsFakeQuantize(), nn.Linear(2, 2)
    )
    model.apply(ao.disable_observer)
    model.apply(ao.disable_fake_quant)
    for fq in model[:2]:
        assert fq.observer_enabled.tolist() == [0] and fq.fake_quant_enabled.tolist() == [0]
        assert fq.qparams() is None
    assert model[0].fake_quant_enabled.dtype == torch.uint8
    assert model[1].fake_quant_enabled.dtype == torch.long
    model.apply(ao.enable_observer)
    model.apply(ao.enable_fake_quant)
    assert all(fq.observer_enabled.tolist() == [1] for fq in model[:2])
    # A torch.ao QConfig takes our factories (torch.ao's own with_args wrapper).
    qconfig = ao.QConfig(
        activation=tqfq.FusedMovingAvgObsFakeQuantize.with_args(reduce_range=True),
        weight=tqfq.FakeQuantize.with_args(
            observer=tqfq.MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=SYM_C,
        ),
    )
    assert isinstance(qconfig.weight(), tqfq.FakeQuantize)
    assert isinstance(tqfq.MinMaxObserver(), ao.ObserverBase)


def test_with_args_builds_fresh_modules_and_chains():
    factory = tqfq.FakeQuantize.with_args(
        observer=tqfq.MovingAverageMinMaxObserver.with_args(averaging_constant=0.5),
        quant_min=-8,
    ).with_args(quant_max=7, dtype=torch.qint8, qscheme=SYM_T)
    a, b = factory(), factory()
    assert a is not b and a.scale is not b.scale
    assert (a.quant_min, a.quant_max, a.dtype, a.qscheme) == (-8, 7, torch.qint8, SYM_T)
    assert a.activation_post_process.averaging_constant == 0.5
    text = repr(a)
    for part in ("quant_min=-8", "quant_max=7", "qscheme=torch.per_tensor_symmetric", "scale="):
        assert part in text
    # With quant_min / quant_max given, the dtype comes from the observer factory's arguments.
    tqfq.FakeQuantize(
        observer=tqfq.MinMaxObserver.with_args(dtype=torch.qint8), quant_min=-128, quant_max=127
    )
    with pytest.raises(ValueError, match="quant_min"):
        tqfq.FakeQuantize(observer=tqfq.MinMaxObserver, quant_min=-128, quant_max=127)
    with pytest.raises(ValueError, match="less than or equal"):
        tqfq.FakeQuantize(quant_min=5, quant_max=1)
    with pytest.raises(TypeError, match="MovingAverage"):
        tqfq.FusedMovingAvgObsFakeQuantize(observer=tqfq.MinMaxObserver)
    with pytest.raises(NotImplementedError, match="float_qparams"):
        tqfq.FusedMovingAvgObsFakeQuantize(
            observer=tqfq.MovingAveragePerChannelMinMaxObserver,
            qscheme=torch.per_channel_affine_float_qparams,
        )


# --- observe() + qparams() == forward --------------------------------------------------------

GRANULARITY_BUILDERS = {
    "per-tensor": lambda: tqfq.FakeQuantize(
        quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=SYM_T
    ),
    "per-channel": lambda: tqfq.FakeQuantize(
        observer=tqfq.MovingAveragePerChannelMinMaxObserver,
        quant_min=0,
        quant_max=255,
        ch_axis=1,
    ),
    "per-group": lambda: tqfq.FakeQuantize(
        observer=tqfq.PerGroupMinMaxObserver,
        group_size=4,
        quant_min=-8,
        quant_max=7,
        dtype=torch.qint8,
        qscheme=AFF_C,
    ),
    "fused-per-tensor": lambda: tqfq.FusedMovingAvgObsFakeQuantize(quant_min=0, quant_max=127),
    "fused-per-channel": lambda: tqfq.FusedMovingAvgObsFakeQuantize(
        observer=tqfq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=SYM_C,
    ),
}


def _apply_qparams(x: Tensor, qp: QParams) -> Tensor:
    if qp.granularity == "per_group":
        return tq.fake_quantize_per_group(
            x, qp.scale, qp.zero_point, qp.group_size, qp.quant_min, qp.quant_max
        )
    if qp.granularity == "per_channel":
        return tq.fake_quantize_per_channel(
            x, qp.scale, qp.zero_point, qp.axis, qp.quant_min, qp.quant_max
        )
    return tq.fake_quantize_per_tensor(x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(GRANULARITY_BUILDERS))
def test_observe_then_qparams_equals_forward(name, dtype, device):
    forward_fq = GRANULARITY_BUILDERS[name]().to(device)
    split_fq = copy.deepcopy(forward_fq)
    expected_kind = name.removeprefix("fused-").replace("-", "_")
    with tq.use_backend("eager"):
        for step, x in enumerate(_steps((6, 8), "drift", seed=4)):
            observe, fake_quant = SCHEDULE[step]
            for fq in (forward_fq, split_fq):
                fq.enable_observer(bool(observe))
                fq.enable_fake_quant(bool(fake_quant))
            xd = x.to(dtype).to(device)
            y = forward_fq(xd)
            split_fq.observe(xd)
            qp = split_fq.qparams()
            _assert_same_state(split_fq, forward_fq, f"step {step}")
            if not fake_quant:
                assert qp is None
                assert_bitwise_equal(y, xd, f"step {step}: disabled")
                continue
            assert qp.granularity == expected_kind
            # The buffers themselves, not copies: the fused linear reads them in place.
            assert qp.scale is split_fq.scale and qp.zero_point is split_fq.zero_point
            assert_bitwise_equal(_apply_qparams(xd, qp), y, f"step {step}: output")


# --- backends --------------------------------------------------------------------------------


@needs_ao
@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize(
    "name", ["fq-per-tensor", "fq-per-channel", "fused-per-tensor", "fused-per-channel"]
)
def test_fake_quantize_backends_match_torch_ao(name, backend, device):
    """The same parity through the Triton kernels (interpreted on the CPU) and the eager path."""
    if backend == "triton" and tq.ops.backend.triton_unavailable_reason(device) is not None:
        pytest.skip(tq.ops.backend.triton_unavailable_reason(device))
    ours, theirs = CHECKPOINT_CASES[name]()
    shape = (7, 12) if theirs.is_per_channel else (6, 5, 4)
    with tq.use_backend(backend):
        _run_parity(ours, theirs, shape, "degenerate_first", device, schedule=SCHEDULE[3:])
        # Per group has no torch.ao twin: forward against the observed qparams.
        fq = GRANULARITY_BUILDERS["per-group"]().to(device)
        x = torch.randn(5, 12, device=device)
        y = fq(x)
        ref = tq.fake_quantize_per_group(x, fq.scale, fq.zero_point, 4, -8, 7)
    assert_bitwise_equal(y, ref, "per-group output")


# --- without torch.ao ------------------------------------------------------------------------

_NO_AO_SCRIPT = """
import sys
import torch
for name in ("torch.ao.quantization.fake_quantize", "torch.ao.quantization.observer"):
    sys.modules[name] = None
import triton_qat.quantizers as fq
import triton_qat.quantizers.base as fq_base
assert fq_base._ao_fake_quantize is None and fq_base._ao_observer is None
factory = fq.FakeQuantize.with_args(
    observer=fq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
    dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
).with_args(averaging_constant=0.5)
m = factory()
assert m.fake_quant_enabled.dtype == torch.uint8
assert m.activation_post_process.averaging_constant == 0.5
x = torch.randn(4, 6)
y = m(x)
assert y.shape == x.shape and m.scale.shape == (4,)
assert m.qparams().axis == 0
m.disable_fake_quant()
assert m.fake_quant_enabled.item() == 0 and m.qparams() is None
m.disable_observer(); m.enable_observer(); m.enable_fake_quant()
f = fq.FusedMovingAvgObsFakeQuantize()
f(x.bfloat16())
assert f.fake_quant_enabled.dtype == torch.long
g = fq.FakeQuantize(observer=fq.PerGroupMinMaxObserver, group_size=3, dtype=torch.qint8,
                    qscheme=torch.per_channel_symmetric)
g(x)
assert g.scale.shape == (4, 2)
print("ok")
"""


def test_works_without_torch_ao():
    env = {**os.environ, "TRITON_QAT_BACKEND": "eager"}
    result = subprocess.run(
        [sys.executable, "-c", _NO_AO_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("qscheme", [torch.per_tensor_affine, torch.per_tensor_symmetric])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_per_token_matches_a_min_max_observer_per_row(qscheme, dtype):
    """Each token: torch.ao's MinMaxObserver qparams on that row alone, then torch's op."""
    from triton_qat.quantizers import DynamicPerTokenFakeQuantize

    ao = pytest.importorskip("torch.ao.quantization")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 5, 16, generator=g) * torch.linspace(0.1, 10, 16)).to(dtype)
    x[0, 0] = 0.0  # an all-zero token
    x[1, 2] = x[1, 2].abs()  # an all-positive token
    fq = DynamicPerTokenFakeQuantize(
        dtype=torch.qint8, qscheme=qscheme, quant_min=-128, quant_max=127
    )
    xr = x.clone().requires_grad_()
    got = fq(xr)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    got.backward(dy)
    rows = x.reshape(-1, 16).float().requires_grad_()
    expected = []
    for row in rows:
        obs = ao.MinMaxObserver(dtype=torch.qint8, qscheme=qscheme, quant_min=-128, quant_max=127)
        obs(row.detach())
        s, z = obs.calculate_qparams()
        expected.append(torch.fake_quantize_per_tensor_affine(row, float(s), int(z), -128, 127))
    expected = torch.stack(expected)
    expected.backward(dy.reshape(-1, 16).float())
    assert_bitwise_equal(got.reshape(-1, 16), expected.to(dtype), "per-token fake quant")
    # Straight-through: the symmetric scale maps absmax to 127.5, which rounds to 128 and is
    # clamped, so that element's gradient is 0, in torch's op as here.
    assert_bitwise_equal(xr.grad.reshape(-1, 16), rows.grad.to(dtype), "per-token gradient")
