"""The observe kernels (triton_qat.kernels.observe) against the eager observer code, bit for bit.

Kernels run on the `device` fixture (interpreted on the CPU). The oracle is the eager code of
triton_qat.quantizers (itself tested against torch.ao in test_fake_quantize.py): torch.aminmax
for the statistics, `_minmax_qparams` (torch.ao's Python formula) and `_fused_qparams`
(torch's ChooseQuantizationParams) for the qparams, the modules' eager forward for the running
updates. Modules are also run side by side with torch.ao through both backends.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from _compare import assert_bitwise_equal

import triton_qat as tq
import triton_qat.quantizers as tqfq
from triton_qat.numerics import observer_formulas as formulas
from triton_qat.quantizers import observers as tq_observers

try:
    import torch.ao.quantization as ao
except ImportError:
    ao = None

needs_ao = pytest.mark.skipif(ao is None, reason="torch.ao.quantization is not installed")

INF, NAN = float("inf"), float("nan")
EPS = torch.finfo(torch.float32).eps


@pytest.fixture
def kernels(device):
    reason = tq.ops.backend.triton_unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)
    from triton_qat.kernels import observe

    return observe


def _input(shape, dtype, special: bool, seed: int = 0) -> torch.Tensor:
    """Random values of several magnitudes; with `special`, +-inf and NaN in some channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 7, shape, generator=g))
    if special:
        flat = x.view(-1)
        n = flat.numel()
        flat[n // 7] = INF
        flat[(3 * n) // 5] = -INF
        flat[n - 2] = NAN
        flat[n // 3] = INF
    return x.to(dtype)


def _eager_minmax(x, axis, group_size):
    if group_size is not None:
        groups = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
        lo, hi = tq_observers._aminmax(groups, torch.float32, dim=-1)
    elif axis is None:
        lo, hi = tq_observers._aminmax(x, torch.float32)
    else:
        lo, hi = tq_observers._aminmax(tq_observers._channel_rows(x, axis), torch.float32, dim=1)
    return lo.reshape(-1), hi.reshape(-1)


LAYOUTS = [
    # (shape, axis, group_size): per tensor, per channel along first / middle / last, per group
    ((37,), None, None),
    ((3, 5, 70), None, None),
    ((6, 33), 0, None),
    ((4, 5, 6), 1, None),
    ((9, 10), -1, None),
    ((2, 3, 130), 2, None),
    ((4, 24), None, 8),
    ((3, 2, 12), None, 12),
]


@pytest.mark.parametrize("special", [False, True], ids=["finite", "inf-nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,axis,group_size", LAYOUTS)
def test_minmax_matches_aminmax(kernels, device, shape, axis, group_size, dtype, special):
    x = _input(shape, dtype, special).to(device)
    expected = _eager_minmax(x, axis, group_size)
    n = expected[0].numel()
    lo = torch.empty(n, device=device)
    hi = torch.empty(n, device=device)
    kernels.observe(x, lo, hi, axis=axis, group_size=group_size)
    assert_bitwise_equal(lo, expected[0], "min")
    assert_bitwise_equal(hi, expected[1], "max")
    if special and x.dim() == 1:
        assert torch.isnan(lo).all() and torch.isnan(hi).all()  # torch.aminmax propagates NaN


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("shape,axis,group_size", [LAYOUTS[1], LAYOUTS[3], LAYOUTS[4]])
def test_minmax_split_channels(kernels, device, shape, axis, group_size, splits):
    """Channels reduced in several slices (as large inputs are on a GPU), NaN in one slice."""
    x = _input(shape, torch.float32, True, seed=splits).to(device)
    expected = _eager_minmax(x, axis, group_size)
    n = expected[0].numel()
    lo, hi = torch.empty(n, device=device), torch.empty(n, device=device)
    kernels.observe(x, lo, hi, axis=axis, group_size=group_size, splits=splits)
    assert_bitwise_equal(lo, expected[0], "min")
    assert_bitwise_equal(hi, expected[1], "max")


def test_minmax_non_contiguous_input(kernels, device):
    x = _input((8, 12), torch.float32, False).to(device).t()
    lo, hi = torch.empty(12, device=device), torch.empty(12, device=device)
    kernels.observe(x, lo, hi, axis=0)
    expected = _eager_minmax(x, 0, None)
    assert_bitwise_equal(lo, expected[0], "min")
    assert_bitwise_equal(hi, expected[1], "max")


def test_signed_zeros_change_no_qparam(kernels, device):
    """Zeros of either sign compare equal: the statistic may differ in sign from torch's (whose
    choice depends on element order), equal in value, and the qparams do not differ at all."""
    x = torch.tensor([[0.0, -0.0, 1.0], [-0.0, 0.0, -2.0], [0.0, -0.0, 0.0]], device=device)
    lo, hi = torch.empty(3, device=device), torch.empty(3, device=device)
    scale = torch.empty(3, device=device)
    zp = torch.empty(3, dtype=torch.int32, device=device)
    eps = torch.tensor([EPS], device=device)
    kernels.observe(
        x, lo, hi, axis=0, qparams=kernels.OBSERVER_QPARAMS, scale=scale, zero_point=zp,
        quant_min=0, quant_max=255, eps=eps,
    )  # fmt: skip
    e_lo, e_hi = _eager_minmax(x, 0, None)
    assert torch.equal(lo, e_lo) and torch.equal(hi, e_hi)
    e_scale, e_zp = formulas.observer_minmax_qparams(
        e_lo, e_hi, 0, 255, torch.per_channel_affine, torch.quint8, False, eps
    )
    assert_bitwise_equal(scale, e_scale, "scale")
    assert_bitwise_equal(zp, e_zp, "zero_point")


# min / max pairs over every regime of both formulas: 0, +-inf, NaN, huge, tiny (the fused
# formula's small-scale cutoff at 6.1e-5 and its neighbours), subnormal, ordinary.
_VALUES = [
    -INF, -3e38, -7.5, -1.0, -6.1e-5 * 255, -1e-6, -1e-40, 0.0, 1e-40, 1e-6, 6.1e-5 * 127,
    6.1e-5 * 255, 0.3, 2.5, 1e4, 3e38, INF, NAN,
]  # fmt: skip
_PAIRS = torch.tensor(list(itertools.product(_VALUES, _VALUES)), dtype=torch.float32)

RANGES = [
    # (quant_min, quant_max, dtype, has_customized_qrange)
    (0, 255, torch.quint8, False),
    (-128, 127, torch.qint8, False),
    (0, 127, torch.quint8, False),  # reduce_range
    (-64, 63, torch.qint8, False),
    (-8, 7, torch.qint8, True),
    (0, 15, torch.quint8, True),
    (-(2**15), 2**15 - 1, torch.int16, False),
    (0, 2**16 - 1, torch.uint16, False),
]


def _assert_qparams_match(kernels, pairs, qmin, qmax, dtype, custom, symmetric):
    """Both qparam formulas of the kernels on the per-row min / max of `pairs` (C, 2) against
    the eager formulas applied to the kernels' own min / max, bit for bit."""
    device = pairs.device
    n = pairs.shape[0]
    lo, hi = torch.empty(n, device=device), torch.empty(n, device=device)
    scale = torch.empty(n, device=device)
    zp = torch.empty(n, dtype=torch.int32, device=device)
    eps = torch.tensor([EPS], device=device)
    zp_sym = formulas.symmetric_zero_point(qmin, qmax, dtype, custom)
    common = dict(quant_min=qmin, quant_max=qmax, symmetric=symmetric, scale=scale, zero_point=zp)
    kernels.observe(
        pairs, lo, hi, axis=0, qparams=kernels.OBSERVER_QPARAMS, eps=eps, zp_symmetric=zp_sym,
        **common,
    )  # fmt: skip
    qscheme = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
    e_scale, e_zp = formulas.observer_minmax_qparams(
        lo, hi, qmin, qmax, qscheme, dtype, custom, eps
    )
    assert_bitwise_equal(scale, e_scale, "observer scale")
    assert_bitwise_equal(zp, e_zp.to(torch.int32), "observer zero_point")

    kernels.observe(pairs, lo, hi, axis=0, qparams=kernels.FUSED_QPARAMS, **common)
    e_scale, e_zp = formulas.fused_qparams(lo, hi, qmin, qmax, symmetric)
    assert_bitwise_equal(scale, e_scale, "fused scale")
    assert_bitwise_equal(zp, e_zp, "fused zero_point")


@pytest.mark.parametrize("symmetric", [False, True], ids=["affine", "symmetric"])
@pytest.mark.parametrize("qrange", RANGES, ids=lambda r: f"{r[0]}..{r[1]}")
def test_qparams_match_eager_formulas(kernels, device, qrange, symmetric):
    qmin, qmax, dtype, custom = qrange
    _assert_qparams_match(kernels, _PAIRS.to(device), qmin, qmax, dtype, custom, symmetric)


_UPDATES = ["RUNNING_MINMAX", "MOVING_AVERAGE_FIRST", "MOVING_AVERAGE", "FUSED_MOVING_AVERAGE"]


def _eager_update(name, run_min, run_max, cur_min, cur_max, c):
    if name == "RUNNING_MINMAX":
        return torch.min(cur_min, run_min), torch.max(cur_max, run_max)
    if name == "MOVING_AVERAGE_FIRST":
        first = (run_min == INF) & (run_max == -INF)
        return (
            torch.where(first, cur_min, run_min + c * (cur_min - run_min)),
            torch.where(first, cur_max, run_max + c * (cur_max - run_max)),
        )
    if name == "MOVING_AVERAGE":
        return run_min + c * (cur_min - run_min), run_max + c * (cur_max - run_max)
    return tuple(
        torch.where(torch.isinf(run), cur, run + c * (cur - run))
        for run, cur in ((run_min, cur_min), (run_max, cur_max))
    )


@pytest.mark.parametrize("update", _UPDATES)
def test_running_updates_match_eager(kernels, device, update):
    """The modules' update formulas (fake_quantize.py), channels in every state: never
    observed (+-inf), one side infinite, NaN, ordinary."""
    x = _input((12, 10), torch.float32, False, seed=3).to(device)
    x[5, 3] = NAN
    x[6, :] = INF
    run_min = torch.tensor([INF, INF, -1.0, 0.5, -INF, 2.0, 1.0, -3.0, NAN, 0.0, -2.0, INF])
    run_max = torch.tensor([-INF, 1.0, 4.0, 0.75, INF, NAN, 1.0, -1.0, 1.0, 0.0, 9.0, -INF])
    run_min, run_max = run_min.to(device), run_max.to(device)
    c = 0.37
    cur = _eager_minmax(x, 0, None)
    expected = _eager_update(update, run_min, run_max, *cur, c)
    kernels.observe(
        x, run_min, run_max, axis=0, update=getattr(kernels, update), averaging_constant=c
    )
    assert_bitwise_equal(run_min, expected[0], "min")
    assert_bitwise_equal(run_max, expected[1], "max")


@pytest.mark.parametrize("observe_on,fake_quant_on", [(1, 1), (0, 1), (1, 0), (0, 0)])
def test_fused_flags_are_read_on_the_device(kernels, device, observe_on, fake_quant_on):
    x = _input((4, 9), torch.float32, False).to(device)
    run_min = torch.tensor([-1.0, INF, 0.0, -0.5], device=device)
    run_max = torch.tensor([1.0, -INF, 2.0, 0.5], device=device)
    scale = torch.full((4,), 0.25, device=device)
    zp = torch.full((4,), 3, dtype=torch.int32, device=device)
    flags = tuple(torch.tensor([v], device=device) for v in (observe_on, fake_quant_on))
    before = run_min.clone(), run_max.clone(), scale.clone(), zp.clone()
    kernels.observe(
        x, run_min, run_max, axis=0, update=kernels.FUSED_MOVING_AVERAGE, averaging_constant=0.01,
        qparams=kernels.FUSED_QPARAMS, scale=scale, zero_point=zp, quant_min=-128, quant_max=127,
        symmetric=True, flags=flags,
    )  # fmt: skip
    if observe_on:
        exp_min, exp_max = _eager_update(
            "FUSED_MOVING_AVERAGE", before[0], before[1], *_eager_minmax(x, 0, None), 0.01
        )
    else:
        exp_min, exp_max = before[0], before[1]
    assert_bitwise_equal(run_min, exp_min, "min")
    assert_bitwise_equal(run_max, exp_max, "max")
    if fake_quant_on:
        exp_scale, exp_zp = formulas.fused_qparams(exp_min, exp_max, -128, 127, True)
    else:
        exp_scale, exp_zp = before[2], before[3]
    assert_bitwise_equal(scale, exp_scale, "scale")
    assert_bitwise_equal(zp, exp_zp, "zero_point")


# --- modules: the kernels end to end, against the eager path and torch.ao ----------------------

SYM_T, AFF_T = torch.per_tensor_symmetric, torch.per_tensor_affine
SYM_C, AFF_C = torch.per_channel_symmetric, torch.per_channel_affine

MODULE_CASES = {
    "minmax-affine": lambda m: m.FakeQuantize(observer=m.MinMaxObserver),
    "minmax-sym-reduce": lambda m: m.FakeQuantize(
        observer=m.MinMaxObserver, quant_min=-64, quant_max=63, dtype=torch.qint8,
        qscheme=SYM_T, reduce_range=True,
    ),
    "moving-avg-4bit": lambda m: m.FakeQuantize(
        observer=m.MovingAverageMinMaxObserver, quant_min=0, quant_max=15, averaging_constant=0.3
    ),
    "per-channel-last": lambda m: m.FakeQuantize(
        observer=m.PerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
        qscheme=SYM_C, ch_axis=1,
    ),
    "moving-avg-per-channel": lambda m: m.FakeQuantize(
        observer=m.MovingAveragePerChannelMinMaxObserver, quant_min=0, quant_max=255,
        qscheme=AFF_C, ch_axis=1, averaging_constant=0.2,
    ),
    "fused-act": lambda m: m.FusedMovingAvgObsFakeQuantize(
        observer=m.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=True
    ),
    "fused-weight": lambda m: m.FusedMovingAvgObsFakeQuantize(
        observer=m.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
        dtype=torch.qint8, qscheme=SYM_C,
    ),
}  # fmt: skip

# Observer / fake-quant switches per step: (observer_enabled, fake_quant_enabled).
_SCHEDULE = [(1, 1), (1, 1), (1, 1), (0, 1), (1, 0), (1, 1), (1, 1)]


def _steps(shape):
    g = torch.Generator().manual_seed(11)
    r = lambda: torch.randn(shape, generator=g)
    yield r() * 3.0 + 1.0
    yield r().abs() + 0.25
    yield torch.zeros(0, *shape[1:])
    yield -r().abs() * 1e-4
    yield r() * 40.0
    yield torch.full(shape, 0.7)
    special = r()
    # Near fp32's limits (max - min overflows); an infinite statistic gives the fused formula a
    # NaN zero point, which fake quant rejects on both paths (the kernel tests cover +-inf).
    special[0, 1], special[1, 2] = 3e38, -3e38
    yield special


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def _run(module, steps, device, backend):
    outputs = []
    with tq.use_backend(backend):
        for (obs, fq), x in zip(_SCHEDULE, steps, strict=True):
            module.enable_observer(bool(obs))
            module.enable_fake_quant(bool(fq))
            outputs.append(module(x.to(device)).cpu())
    return outputs


@pytest.mark.parametrize("name", sorted(MODULE_CASES))
def test_module_kernels_match_eager_and_torch_ao(kernels, device, name):
    """Buffers, outputs and state_dicts bit-exact: Triton path vs eager path vs torch.ao."""
    shape = (5, 6)
    ours = _quiet(lambda: MODULE_CASES[name](tqfq)).to(device)
    eager = copy.deepcopy(ours)
    out_k = _run(ours, _steps(shape), device, "auto")
    out_e = _run(eager, _steps(shape), device, "eager")
    for step, (a, b) in enumerate(zip(out_k, out_e, strict=True)):
        assert_bitwise_equal(a, b, f"{name} step {step}: output")
    sd_k, sd_e = ours.state_dict(), eager.state_dict()
    assert list(sd_k) == list(sd_e)
    for key in sd_e:
        assert_bitwise_equal(sd_k[key].cpu(), sd_e[key].cpu(), f"{name}: {key}")
    if ao is None:
        return
    theirs = _quiet(lambda: MODULE_CASES[name](ao))
    out_t = _quiet(lambda: _run(theirs, _steps(shape), "cpu", "eager"))
    for step, (a, b) in enumerate(zip(out_k, out_t, strict=True)):
        assert_bitwise_equal(a, b, f"{name} step {step}: output vs torch.ao")
    sd_t = theirs.state_dict()
    assert list(sd_k) == list(sd_t)
    for key in sd_t:
        assert_bitwise_equal(sd_k[key].cpu(), sd_t[key], f"{name}: {key} vs torch.ao")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_observers_half_inputs_match_eager(kernels, device, dtype):
    for make in (
        lambda: tqfq.MovingAverageMinMaxObserver(dtype=torch.qint8, qscheme=SYM_T),
        lambda: tqfq.PerChannelMinMaxObserver(ch_axis=1),
        lambda: tqfq.PerGroupMinMaxObserver(group_size=4),
    ):
        ours = make().to(device)
        eager = copy.deepcopy(ours)
        for step in range(3):
            x = _input((6, 8), dtype, step == 2, seed=step).to(device)
            ours(x)
            with tq.use_backend("eager"):
                eager(x)
            for key, value in eager.state_dict().items():
                assert_bitwise_equal(ours.state_dict()[key], value, f"{type(ours).__name__} {key}")
        assert_bitwise_equal(ours.calculate_qparams()[0], eager.calculate_qparams()[0], "scale")


def test_kernels_are_deterministic(kernels, device):
    x = _input((64, 96), torch.float32, True, seed=5).to(device)
    results = []
    for _ in range(2):
        lo, hi = torch.empty(96, device=device), torch.empty(96, device=device)
        kernels.observe(x, lo, hi, axis=1)
        results.append((lo, hi))
    assert_bitwise_equal(results[0][0], results[1][0], "min")
    assert_bitwise_equal(results[0][1], results[1][1], "max")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
def test_fused_observe_does_not_sync(kernels, device):
    if device.type != "cuda":
        pytest.skip("runs on the CUDA device only")
    fq = tqfq.FusedMovingAvgObsFakeQuantize(
        observer=tqfq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
        dtype=torch.qint8, qscheme=SYM_C,
    ).to(device)  # fmt: skip
    x = torch.randn(64, 32, device=device)
    fq.observe(x)  # first call: compiles, sizes the buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fq.observe(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("qscheme", [AFF_T, SYM_T])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_token_qparams_match_eager(kernels, device, qscheme, dtype):
    x = _input((3, 4, 20), dtype, True, seed=2).to(device)
    x[1, 2] = 0.0  # an all-zero token
    got = tqfq.per_token_qparams(x, -128, 127, qscheme, torch.qint8)
    with tq.use_backend("eager"):
        expected = tqfq.per_token_qparams(x, -128, 127, qscheme, torch.qint8)
    assert_bitwise_equal(got[0], expected[0], "scale")
    assert_bitwise_equal(got[1], expected[1], "zero_point")


def test_wide_ranges_run_the_eager_code(kernels, device):
    """qint32's range does not fit the kernels' fp32 carriage: the eager code runs, same result."""
    x = _input((4, 6), torch.float32, False).to(device)
    ours = tqfq.MinMaxObserver(dtype=torch.qint32).to(device)
    ours(x)
    eager = tqfq.MinMaxObserver(dtype=torch.qint32).to(device)
    with tq.use_backend("eager"):
        eager(x)
    for key, value in eager.state_dict().items():
        assert_bitwise_equal(ours.state_dict()[key], value, key)


try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the GPU machine may lack hypothesis
    given = None


if given is not None:
    _stat = st.floats(width=32, allow_nan=True, allow_infinity=True)

    @st.composite
    def _qparam_cases(draw):
        bits = draw(st.integers(2, 16))
        signed = draw(st.booleans())
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        reduce = draw(st.booleans())
        if reduce:
            qmin, qmax = qmin // 2, qmax // 2
        pairs = draw(st.lists(st.tuples(_stat, _stat), min_size=1, max_size=16))
        return qmin, qmax, draw(st.booleans()), pairs

    @given(_qparam_cases())
    def test_property_qparams_equal_eager_formulas(device, case):
        """Any fp32 min / max (NaN, +-inf, subnormals included) and any range up to 16 bits:
        both formulas bit-exact with the eager code."""
        if tq.ops.backend.triton_unavailable_reason(device) is not None:
            pytest.skip(tq.ops.backend.triton_unavailable_reason(device))
        from triton_qat.kernels import observe as kernels

        qmin, qmax, symmetric, pairs = case
        x = torch.tensor(pairs, dtype=torch.float32, device=device)
        dtype = torch.qint8 if qmin < 0 else torch.quint8
        _assert_qparams_match(kernels, x, qmin, qmax, dtype, True, symmetric)
