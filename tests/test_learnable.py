"""Learnable scale / zero point (LSQ): the reference against torch's learnable ops, the Triton
backward kernel against the reference, LearnableFakeQuantize against torch.ao's
_LearnableFakeQuantize, and tq.nn.Linear with a learnable qconfig."""

from __future__ import annotations

import pytest
import torch
from _compare import assert_bitwise_equal

import triton_qat as tq
from triton_qat import quantizers as tfq
from triton_qat.numerics import reference
from triton_qat.ops import functional as ops
from triton_qat.qconfig import learnable_qconfig
from triton_qat.tools import check

# torch's learnable backward computes zp + x * inv and (q - zp) * scale - x as fused
# multiply-adds in its AVX2 / AVX-512 builds (the compiler contracts them); its DEFAULT build
# rounds twice. The reference follows the former, so parity with torch is asserted there only.
torch_fma_build = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="torch's DEFAULT CPU build does not fuse the multiply-adds of its learnable backward",
)


def _qparams(shape, axis, zp_center, seed):
    g = torch.Generator().manual_seed(seed)
    n = 1 if axis is None else shape[axis]
    scale = torch.rand(n, generator=g) * 0.1 + 0.02
    if axis is None:  # exactly zp_center: the per-tensor backward's trunc(zp + 0.5) shows
        return scale, torch.tensor([zp_center])
    zero_point = zp_center + torch.randint(-2, 3, (n,), generator=g).float()
    return scale, zero_point


def _data(shape, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * spread, torch.randn(shape, generator=g)


def _torch_learnable(x, dy, scale, zp, axis, qmin, qmax, gf):
    xx, s, z = (t.clone().requires_grad_() for t in (x, scale, zp))
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(xx, s, z, qmin, qmax, gf)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(xx, s, z, axis, qmin, qmax, gf)
    y.backward(dy)
    return y.detach(), xx.grad, s.grad, z.grad


_ours = check.learnable_grads


def test_learnable_zero_point_rounding():
    zp = torch.tensor([-1.5, -0.7, -0.5, 0.5, 1.5, 2.5, 2.4, 300.0, -300.0])
    fwd = reference.learnable_zero_point(zp, -128, 127, trunc=False)
    bwd = reference.learnable_zero_point(zp, -128, 127, trunc=True)
    assert fwd.tolist() == [-2, -1, 0, 0, 2, 2, 2, 127, -128]
    # torch's per-tensor backward: trunc(clamp(zp + 0.5)), toward zero.
    assert bwd.tolist() == [-1, 0, 0, 1, 2, 3, 2, 127, -128]


CASES = [
    # shape, axis, (qmin, qmax), zero point around, grad_factor
    ((64,), None, (-128, 127), -1.5, 1.0),
    ((5, 7, 9), None, (0, 255), 2.5, 0.37),
    ((5, 7, 9), None, (-8, 7), -0.7, 0.01),
    ((6, 10), 0, (-128, 127), 2.4, 1.0),
    ((4, 6, 5), 1, (0, 15), 7.6, 0.5),
    ((3, 4, 8), 2, (-8, 7), -2.5, 0.125),
    ((3, 4, 8), -3, (0, 255), 128.5, 1 / 3),
]


@torch_fma_build
@pytest.mark.parametrize("shape,axis,qrange,zp_center,gf", CASES)
def test_reference_equals_torch(shape, axis, qrange, zp_center, gf):
    """Forward, dx, dscale and dzp bit for bit: the per-element terms are torch's, and both
    sum them with torch.sum over a tensor of x's shape and the same dims."""
    x, dy = _data(shape, seed=len(shape))
    torch_axis = None if axis is None else axis % len(shape)
    scale, zp = _qparams(shape, torch_axis, zp_center, seed=1)
    got = _ours(x, dy, scale, zp, axis, *qrange, gf, "eager")
    want = _torch_learnable(x, dy, scale, zp, torch_axis, *qrange, gf)
    for name, a, b in zip(("y", "dx", "dscale", "dzp"), got, want, strict=True):
        assert_bitwise_equal(a, b, name)


def _ties_one_per_channel(zp_offset: float, n: int = 600):
    """(x, dy, scale, zp) of shape (3n, 1), one element per channel along axis 0, so the
    per-channel dscale / dzp are the per-element terms themselves: x at ties of x * inv, their
    fp32 neighbours, and values beyond both ends of [-128, 127]."""
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(n, generator=g) * 0.2 + 0.01
    zp = torch.randint(-20, 20, (n,), generator=g).float() + zp_offset
    k = torch.randint(-160, 160, (n,), generator=g).float()
    x = (k + 0.5) * scale
    up, down = torch.full_like(x, 1e9), torch.full_like(x, -1e9)
    x = torch.cat([x, torch.nextafter(x, up), torch.nextafter(x, down)]).view(-1, 1)
    return x, torch.randn(x.shape, generator=g), scale.repeat(3), zp.repeat(3)


@torch_fma_build
@pytest.mark.parametrize("zp_offset", [0.0, -1.5, 3.0])
def test_reference_terms_at_ties_and_saturation(zp_offset):
    """Per-element terms bit for bit with torch's at ties, next to ties and saturated."""
    x, dy, scale, zp = _ties_one_per_channel(zp_offset)
    got = _ours(x, dy, scale, zp, 0, -128, 127, 0.7, "eager")
    want = _torch_learnable(x, dy, scale, zp, 0, -128, 127, 0.7)
    for name, a, b in zip(("y", "dx", "dscale", "dzp"), got, want, strict=True):
        assert_bitwise_equal(a, b, name)
    saturated = want[3] != 0
    assert 0 < int(saturated.sum()) < x.numel()  # both branches exercised


KERNEL_CASES = [
    # more than one tile along the reduction in each layout (tiles hold 4096 elements)
    ((50, 90), None, (-128, 127), -1.5),
    ((6, 700), 0, (-8, 7), 0.0),
    ((300, 12), 1, (0, 255), 100.0),
    ((4, 5, 600), 1, (-128, 127), 3.0),
]


@pytest.mark.parametrize("shape,axis,qrange,zp_center", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_reference(device, shape, axis, qrange, zp_center, dtype):
    dz_terms = _check_kernel(device, shape, axis, qrange, zp_center, dtype)
    assert bool((dz_terms != 0).any()) and bool((dz_terms == 0).any())  # both branches


def _check_kernel(device, shape, axis, qrange, zp_center, dtype):
    """Forward and dx bit for bit; dscale / dzp: the kernel sums the reference's terms in
    another order (tiles, then partials), so each is within (n - 1) * 2**-24 * sum|terms| of
    the exact sum, the bound of any fp32 summation order. Two runs give the same bits.
    Returns the reference's zero-point terms."""
    x, dy = _data(shape, seed=7)
    x, dy = x.to(dtype).to(device), dy.to(dtype).to(device)
    scale, zp = (t.to(device) for t in _qparams(shape, axis, zp_center, seed=2))
    gf = 0.3
    got = _ours(x, dy, scale, zp, axis, *qrange, gf, "triton")
    again = _ours(x, dy, scale, zp, axis, *qrange, gf, "triton")
    want = _ours(x, dy, scale, zp, axis, *qrange, gf, "eager")
    assert_bitwise_equal(got[0], want[0], "y")
    assert_bitwise_equal(got[1], want[1], "dx")
    for a, b in zip(got, again, strict=True):
        assert_bitwise_equal(a, b, "rerun")
    nq = ops.learnable_backward_norm(x.cpu(), scale.cpu(), zp.cpu(), *qrange, axis)
    _, ds_terms, dz_terms = reference.learnable_grad_terms_ref(x.cpu(), dy.cpu(), nq, gf)
    dims = reference.learnable_reduce_dims(x.shape, axis)
    for name, grad, terms in (("dscale", got[2], ds_terms), ("dzp", got[3], dz_terms)):
        rel, bound = check.summation_error(grad, terms, dims)
        assert rel <= bound, f"{name}: relative error {rel} above the summation bound {bound}"
    return dz_terms


def test_kernel_terms_at_ties_and_saturation(device):
    """One element per channel: the kernel's terms, unsummed, bit for bit with the reference."""
    data = [t.to(device) for t in _ties_one_per_channel(-1.5)]
    got = _ours(*data, 0, -128, 127, 0.7, "triton")
    want = _ours(*data, 0, -128, 127, 0.7, "eager")
    for name, a, b in zip(("y", "dx", "dscale", "dzp"), got, want, strict=True):
        assert_bitwise_equal(a, b, name)


def test_no_grad_forward_and_validation(device):
    x = torch.randn(4, 6, device=device)
    s = torch.full((6,), 0.05, device=device)
    z = torch.zeros(6, device=device)
    y = ops.fake_quantize_learnable_per_channel(x, s, z, 1, -128, 127)
    assert_bitwise_equal(y, tq.fake_quantize_per_channel(x, s, z.int(), 1, -128, 127), "y")
    with pytest.raises(TypeError, match="zero_point"):
        ops.fake_quantize_learnable_per_channel(x, s, z.int(), 1, -128, 127)
    with pytest.raises(ValueError, match="zero_point"):
        ops.fake_quantize_learnable_per_channel(x, s, z[:3], 1, -128, 127)
    with pytest.raises(ValueError, match="scale"):
        ops.fake_quantize_learnable(x, s, z, -128, 127)
    with pytest.raises(ValueError, match="axis"):
        ops.fake_quantize_learnable_per_channel(x, s, z, 2, -128, 127)
    with pytest.raises(TypeError, match="grad_factor"):
        ops.fake_quantize_learnable(x, s[:1], z[:1], -128, 127, grad_factor="1")
    with pytest.raises(ValueError, match="quant_min"):
        ops.fake_quantize_learnable(x, s[:1], z[:1], 5, 2)


@pytest.mark.parametrize(
    "observer_name,qscheme,kwargs",
    [
        ("MovingAverageMinMaxObserver", torch.per_tensor_affine, {}),
        ("MovingAveragePerChannelMinMaxObserver", torch.per_channel_affine, {"ch_axis": 1}),
        ("PerChannelMinMaxObserver", torch.per_channel_symmetric, {"ch_axis": 0}),
    ],
)
def test_module_matches_torch_ao(observer_name, qscheme, kwargs):
    """Static estimates for two steps, then parameter learning, with SGD: outputs, input
    gradients, qparam gradients and the parameters after each step, bit for bit."""
    from torch.ao.quantization import observer as ao_observer
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    shape = (4, 6, 5)
    common = dict(quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=qscheme)
    common.update(kwargs, use_grad_scaling=True)
    if "ch_axis" in kwargs:
        common["channel_len"] = shape[kwargs["ch_axis"]]
    ao = _LearnableFakeQuantize(getattr(ao_observer, observer_name), **common)
    ours = tfq.LearnableFakeQuantize(getattr(tfq, observer_name), **common)
    assert list(ours.state_dict()) == list(ao.state_dict())
    opt_ao = torch.optim.SGD(ao.parameters(), lr=0.01)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    with tq.use_backend("eager"):
        for step in range(5):
            if step == 2:
                ao.enable_param_learning()
                ours.enable_param_learning()
            x = torch.randn(shape, generator=g) * 2
            dy = torch.randn(shape, generator=g)
            xa, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yo = ao(xa), ours(xo)
            ya.backward(dy)
            yo.backward(dy)
            assert_bitwise_equal(yo, ya, f"step {step} y")
            assert_bitwise_equal(xo.grad, xa.grad, f"step {step} dx")
            assert_bitwise_equal(ours.scale.grad, ao.scale.grad, f"step {step} dscale")
            assert_bitwise_equal(ours.zero_point.grad, ao.zero_point.grad, f"step {step} dzp")
            opt_ao.step()
            opt_ours.step()
            opt_ao.zero_grad()
            opt_ours.zero_grad()
            assert_bitwise_equal(ours.scale.detach(), ao.scale.detach(), f"step {step} scale")
            assert_bitwise_equal(ours.zero_point.detach(), ao.zero_point.detach(), "zp")
    for key, value in ao.state_dict().items():
        assert_bitwise_equal(ours.state_dict()[key], value, key)


def test_module_channel_len_from_observer_and_state_dict():
    kwargs = dict(quant_min=-8, quant_max=7, dtype=torch.qint8, qscheme=torch.per_channel_affine)
    fq = tfq.LearnableFakeQuantize(tfq.PerChannelMinMaxObserver, init_from_observer=True, **kwargs)
    fq(torch.randn(5, 3))
    assert fq.scale.shape == (5,) and fq.learning_enabled.item() == 1
    assert fq.static_enabled.item() == 0 and fq.scale.requires_grad
    fresh = tfq.LearnableFakeQuantize(tfq.PerChannelMinMaxObserver, **kwargs)
    fresh.load_state_dict(fq.state_dict())
    assert_bitwise_equal(fresh.scale.detach(), fq.scale.detach(), "scale")
    assert isinstance(fresh.scale, torch.nn.Parameter)


def _train_lsq_model(steps: int, qconfig="int8_per_channel_lsq"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model = tq.prepare_qat(model, qconfig)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 16, generator=g)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_linear_with_learnable_qconfig_trains_saves_and_is_deterministic():
    assert "int8_per_channel_lsq" in tq.list_qconfigs()
    model = _train_lsq_model(0)
    fq = model[0].weight_fake_quant
    assert isinstance(fq, tfq.LearnableFakeQuantize)
    names = [n for n, _ in model.named_parameters()]
    assert "0.weight_fake_quant.scale" in names and "2.weight_fake_quant.zero_point" in names
    x = torch.randn(6, 16)
    model(x).square().mean().backward()  # the first forward initialises from the observer
    init_scale = fq.scale.detach().clone()
    assert fq.scale.shape == (8,) and fq.learning_enabled.item() == 1
    assert fq.scale.grad is not None and bool((fq.scale.grad != 0).any())

    a, b = _train_lsq_model(3), _train_lsq_model(3)
    assert not torch.equal(a[0].weight_fake_quant.scale.detach(), init_scale)  # trained
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert_bitwise_equal(sb[key], sa[key], f"two identical runs: {key}")

    fresh = _train_lsq_model(0)
    fresh.load_state_dict(sa)
    for key, value in fresh.state_dict().items():
        assert_bitwise_equal(value, sa[key], f"reloaded {key}")
    x = torch.randn(3, 16)
    assert_bitwise_equal(fresh(x), a(x), "output after reload")
    # convert freezes the learned qparams: integer weights, the QAT model's outputs up to
    # matmul rounding (the converted layer may run the integer GEMM kernels, which sum in
    # another order: fp32, K = 16 terms, so a few ulps).
    with torch.no_grad():
        torch.testing.assert_close(tq.convert(a)(x), a(x), rtol=1e-5, atol=1e-6)


def test_learnable_qconfig_derivation():
    qc = learnable_qconfig("x86")  # per-channel weights, affine per-tensor input
    layer = tq.nn.Linear(8, 4, qconfig=qc)
    assert isinstance(layer.weight_fake_quant, tfq.LearnableFakeQuantize)
    assert isinstance(layer.input_fake_quant, tfq.LearnableFakeQuantize)
    assert layer.input_fake_quant.quant_max == 127  # x86's reduced activation range
    layer(torch.randn(3, 8)).sum().backward()
    assert layer.input_fake_quant.zero_point.grad is not None
    with pytest.raises(ValueError, match="per-group"):
        learnable_qconfig("int4_per_group")


# --- property: random problems (the fuzz budget: conftest's hypothesis profiles) -----------

try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None


if given is not None:

    @st.composite
    def _learnable_cases(draw):
        ndim = draw(st.integers(1, 3))
        shape = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
        # torch's per-channel op needs 2-D or more (it sums over the other dims)
        axis = draw(st.none() | st.integers(0, ndim - 1)) if ndim > 1 else None
        qrange = draw(st.sampled_from([(-128, 127), (0, 255), (-8, 7), (0, 15), (-2, 1)]))
        # a whole zero point in the range (per channel it is spread by -2..2, then clamped)
        zp_center = float(draw(st.integers(*qrange)))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
        return shape, axis, qrange, zp_center, dtype

    @given(_learnable_cases())
    def test_property_kernel_equals_reference(device, case):
        _check_kernel(device, *case)
