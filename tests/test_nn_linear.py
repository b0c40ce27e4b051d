"""tq.nn.Linear as a drop-in for torch.ao.nn.qat.Linear, and the prepare / convert flow."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _compare import assert_bitwise_equal, assert_within

import triton_qat as tq

ao = pytest.importorskip("torch.ao.quantization")
nnqat = pytest.importorskip("torch.ao.nn.qat")

BACKEND_QCONFIGS = [("x86", 1), ("x86", 0), ("qnnpack", 1), ("qnnpack", 0), ("fbgemm", 1)]


def _pair(backend, version, in_f=24, out_f=10, seed=0):
    torch.manual_seed(seed)
    qconfig = ao.get_default_qat_qconfig(backend, version=version)
    ref = nnqat.Linear(in_f, out_f, qconfig=qconfig)
    ours = tq.nn.Linear(in_f, out_f, qconfig=qconfig)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("backend,version", BACKEND_QCONFIGS)
@pytest.mark.parametrize("tq_backend", ["eager", "triton"])
def test_training_steps_match_torch_ao(backend, version, tq_backend):
    """Outputs, observer buffers, scales / zero points and gradients over several SGD steps."""
    ref, ours = _pair(backend, version)
    assert list(ours.state_dict()) == list(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    wq = []  # torch.ao's fake-quantized weight of each step (bit for bit ours, below)
    ref.weight_fake_quant.register_forward_hook(lambda m, i, out: wq.append(out.detach()))
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(6, 24, generator=g) * (1 + step)
        with tq.use_backend(tq_backend):
            y_ours = ours(x)
            y_ours.square().sum().backward()
        y_ref = ref(x)
        y_ref.square().sum().backward()
        # The fused GEMM sums in another order than torch's matmul (whose order moves with its
        # thread count): each side's fp32 sum of n terms is within n * 2**-24 of the sum of
        # their magnitudes of the exact one (n = K + 1 with the bias, M for the weight's and
        # the bias's gradients, whose dy = 2y also carries the outputs' difference).
        u = 2.0**-24
        m, k = x.shape
        x64, w64, b64 = x.double(), wq[-1].double(), ref.bias.detach().double()
        y_bound = 2 * (k + 1) * u * (x64.abs() @ w64.abs().T + b64.abs())
        assert_within(y_ours, y_ref, y_bound, f"step {step}: output")
        dy_diff = 2 * (y_ours.detach().double() - y_ref.detach().double()).abs()
        dy_abs = 2 * y_ref.detach().double().abs()
        dw_bound = dy_diff.T @ x64.abs() + 2 * m * u * (dy_abs.T @ x64.abs())
        db_bound = dy_diff.sum(0) + 2 * m * u * dy_abs.sum(0)
        for (name, a), (_, b) in zip(
            ours.state_dict().items(), ref.state_dict().items(), strict=True
        ):
            if "fake_quant" in name:  # observer buffers, scales and zero points: bit-exact
                assert_bitwise_equal(a, b, f"step {step}: {name}")
        assert_within(ours.weight.grad, ref.weight.grad, dw_bound, f"step {step}: weight grad")
        assert_within(ours.bias.grad, ref.bias.grad, db_bound, f"step {step}: bias grad")
        opt_ref.step()
        opt_ours.step()
        opt_ref.zero_grad()
        opt_ours.zero_grad()
        # The fused GEMM's gradients differ from torch's in the last bits; keep the weights
        # the same so the observers see the same values and can be compared bit for bit.
        with torch.no_grad():
            ours.weight.copy_(ref.weight)
            ours.bias.copy_(ref.bias)
    # Fake-quantized weights are bit-exact.
    wq_ref = ref.weight_fake_quant(ref.weight.detach())
    wq_ours = ours.weight_fake_quant(ours.weight.detach())
    assert_bitwise_equal(wq_ours, wq_ref, "fake-quantized weight")


@pytest.mark.parametrize("backend,version", [("x86", 1), ("qnnpack", 0)])
def test_state_dict_loads_both_ways(backend, version):
    ref, ours = _pair(backend, version)
    x = torch.randn(5, 24)
    ours(x)  # observers have run: non-trivial buffers
    fresh_ref = nnqat.Linear(24, 10, qconfig=ao.get_default_qat_qconfig(backend, version=version))
    fresh_ref.load_state_dict(ours.state_dict())
    for (k, a), (_, b) in zip(
        fresh_ref.state_dict().items(), ours.state_dict().items(), strict=True
    ):
        assert_bitwise_equal(a, b, k)
    ref(x * 3)
    fresh_ours = tq.nn.Linear(24, 10, qconfig=ao.get_default_qat_qconfig(backend, version=version))
    fresh_ours.load_state_dict(ref.state_dict())
    for (k, a), (_, b) in zip(
        fresh_ours.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert_bitwise_equal(a, b, k)


def test_switches_from_torch_ao_helpers():
    ref, ours = _pair("x86", 1)
    x = torch.randn(4, 24)
    for m in (ref, ours):
        m.apply(ao.disable_observer)
        m.apply(ao.disable_fake_quant)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours(x), torch.nn.functional.linear(x, ours.weight, ours.bias))
    for m in (ref, ours):
        m.apply(ao.enable_fake_quant)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert_bitwise_equal(a, b, k)  # observer off: buffers as torch.ao leaves them


def test_needs_qconfig():
    with pytest.raises(ValueError, match="qconfig must be provided"):
        tq.nn.Linear(4, 3)


def test_from_float_shares_parameters_and_to_float():
    float_lin = torch.nn.Linear(8, 3)
    float_lin.qconfig = "int8_per_channel"
    qat = tq.nn.Linear.from_float(float_lin)
    assert qat.weight is float_lin.weight and qat.bias is float_lin.bias
    back = qat.to_float()
    assert type(back) is torch.nn.Linear
    assert torch.equal(back.weight, float_lin.weight)
    assert back.weight is not float_lin.weight
    with pytest.raises(ValueError, match="qconfig"):
        tq.nn.Linear.from_float(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="only works for"):
        tq.nn.Linear.from_float(qat)


def test_torch_ao_prepare_qat_with_mapping():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model.qconfig = ao.get_default_qat_qconfig("x86")
    model.train()
    prepared = ao.prepare_qat(copy.deepcopy(model), mapping={torch.nn.Linear: tq.nn.Linear})
    assert isinstance(prepared[0], tq.nn.Linear) and isinstance(prepared[2], tq.nn.Linear)
    from triton_qat.quantizers import FusedMovingAvgObsFakeQuantize

    # torch.ao's device-placing factory wrappers are adapted: the fused path runs.
    assert isinstance(prepared[0].weight_fake_quant, FusedMovingAvgObsFakeQuantize)
    y = prepared(torch.randn(3, 8))
    y.sum().backward()
    assert prepared[0].weight.grad is not None


class _CustomFakeQuant(torch.nn.Module):
    def forward(self, w):
        return w.round()


def test_unknown_fake_quant_is_honoured_with_one_warning():
    qc = tq.QConfig(weight=_CustomFakeQuant)
    lin = tq.nn.Linear(4, 3, qconfig=qc)
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = lin(x)
        lin(x)
    assert sum("_CustomFakeQuant" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight.round(), lin.bias))


@pytest.mark.parametrize(
    "name",
    ["int8_per_channel", "int8_per_tensor", "int4_per_group", "w8a8_dynamic", "w4a8_dynamic"],
)
def test_prepare_then_convert(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    qat = tq.prepare_qat(model, name)
    assert qat is not model and all(isinstance(m, tq.nn.Linear) for m in (qat[0], qat[2]))
    assert type(model[0]) is torch.nn.Linear  # inplace=False leaves the original alone
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    for _ in range(3):
        loss = qat(torch.randn(16, 64)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    qat.eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        y_qat = qat(x)
        converted = tq.convert(qat)
        y_int = converted(x)
    assert not any(isinstance(m, tq.nn.Linear) for m in converted.modules())
    from triton_qat.quantizers import FakeQuantizeBase

    assert not any(isinstance(m, FakeQuantizeBase) for m in converted.modules())
    codes = converted[0].qweight
    assert codes.dtype in (torch.int8, torch.uint8)
    if name == "int4_per_group":
        assert codes.shape == (32, 32)  # two 4-bit codes per byte
    # Same dequantized weights as the QAT layer's fake quant: equal up to matmul rounding.
    torch.testing.assert_close(y_int, y_qat, rtol=1e-5, atol=1e-5)
