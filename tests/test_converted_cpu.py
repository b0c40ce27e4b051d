"""The eager CPU forward of a converted linear (ops/quantized_linear.py): per-token input fake
quant and weight dequant in few passes, equal to the reference formulas bit for bit."""

import pytest
import torch
import torch.nn.functional as F

import triton_qat as tq
from triton_qat import quantizers
from triton_qat.flow.convert import QuantizedLinear
from triton_qat.numerics.qparams import PerTokenQParams
from triton_qat.ops import quantized_linear
from triton_qat.ops.quantized_linear import (
    _finite_row_qparams,
    fake_quantize_per_token_inference,
    fake_quantize_per_token_shared,
)
from triton_qat.quantizers import fake_quantize_per_token_spec

# A row whose lowest code, round(lo * (1 / scale)) + zero_point, is quant_min - 1: its zero
# point came from round(lo / scale), a true division, so the affine rows need their clamp.
_CLAMPED_ROW = [
    -9.141231536865234,
    5.360311508178711,
    -3.102180004119873,
    13.332768440246582,
    -4.408624649047852,
    4.453353404998779,
    1.2225255966186523,
    -23.824125289916992,
]


def _rows(k: int, seed: int) -> torch.Tensor:
    """Rows of every magnitude, all-positive, all-negative, constant and zero rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, k, generator=gen) * torch.logspace(-30, 30, 40).view(-1, 1)
    x[1] = x[1].abs()
    x[2] = -x[2].abs()
    x[3] = 0.0
    x[4] = 2.5
    x[5, :2] = 3e38  # finite, but hi - lo overflows: an infinite scale
    x[6] *= 1e-38  # subnormal values
    return x


def _spec(symmetric: bool, **kw) -> PerTokenQParams:
    return PerTokenQParams(-128, 127, symmetric, **kw)


def _expected(x: torch.Tensor, spec: PerTokenQParams) -> torch.Tensor:
    with tq.use_backend("eager"):
        return fake_quantize_per_token_spec(x, spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "spec",
    [
        _spec(True),
        _spec(False),
        PerTokenQParams(0, 255, True, 128),  # a symmetric zero point that is not 0
        PerTokenQParams(-8, 7, False, eps=1e-5),  # an eps fp32 cannot hold exactly
        _spec(False, eps=0.0),  # zero scales: the reference path
        _spec(True, eps=1e-45),  # 1 / eps overflows fp32: the reference path
    ],
)
@pytest.mark.parametrize("k", [1, 7, 48])
def test_per_token_inference_equals_the_reference(spec, dtype, k):
    x = _rows(k, seed=k)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dtype)
    got = fake_quantize_per_token_inference(x, spec)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, _expected(x, spec), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_token_inference_non_finite_rows(symmetric):
    x = _rows(16, seed=3)
    x[7, 3] = float("inf")
    x[8, 0] = float("-inf")
    x[9, 5] = float("nan")
    spec = _spec(symmetric)
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    assert not _finite_row_qparams(lo, hi, spec)[3]  # the reference path, for every row
    got = fake_quantize_per_token_inference(x, spec)
    torch.testing.assert_close(got, _expected(x, spec), rtol=0, atol=0, equal_nan=True)


def test_per_token_inference_fast_path_and_its_clamps():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen) * 3
    x[0] = torch.tensor(_CLAMPED_ROW)
    for symmetric, clamps in ((False, True), (True, False)):
        spec = _spec(symmetric)
        _, _, _, fast, clamp = _finite_row_qparams(x.amin(dim=1), x.amax(dim=1), spec)
        assert fast and clamp == clamps
        got = fake_quantize_per_token_inference(x, spec)
        torch.testing.assert_close(got, _expected(x, spec), rtol=0, atol=0)
    # Without that row no affine row needs its clamp; the values do not change.
    spec = _spec(False)
    assert not _finite_row_qparams(x[1:].amin(dim=1), x[1:].amax(dim=1), spec)[4]
    torch.testing.assert_close(
        fake_quantize_per_token_inference(x[1:], spec), _expected(x[1:], spec), rtol=0, atol=0
    )


def test_per_token_inference_empty():
    x = torch.empty(0, 8)
    assert fake_quantize_per_token_inference(x, _spec(False)).shape == (0, 8)


def _weight_qconfig(qmin: int, qmax: int, **kw) -> tq.QConfig:
    if "group_size" in kw:
        observer = quantizers.PerGroupMinMaxObserver
        kw["qscheme"] = torch.per_channel_symmetric
    elif "ch_axis" in kw:
        observer = quantizers.PerChannelMinMaxObserver
        kw.setdefault("qscheme", torch.per_channel_affine)
    else:
        observer = quantizers.MinMaxObserver
        kw["qscheme"] = torch.per_tensor_affine
    dtype = torch.qint32 if qmax > 127 else torch.qint8
    weight = quantizers.FakeQuantize.with_args(
        observer=observer, quant_min=qmin, quant_max=qmax, dtype=dtype, **kw
    )
    return tq.QConfig(weight=weight)


_LAYOUTS = {
    "int8_per_channel": "int8_per_channel",
    "int4_per_group": "int4_per_group",
    "int4_group_3_odd_k": _weight_qconfig(-8, 7, group_size=3),
    "int4_per_channel_affine": _weight_qconfig(-8, 7, ch_axis=0),
    "uint4_per_tensor": _weight_qconfig(0, 15),
    "int8_along_in_features": _weight_qconfig(-128, 127, ch_axis=1),
    "int16_codes": _weight_qconfig(-1000, 1000, ch_axis=0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_dequantized_weight_is_the_qat_fake_quant(layout, dtype):
    k = 15 if layout == "int4_group_3_odd_k" else 64
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(k, 9)).to(dtype)
    with tq.use_backend("eager"), torch.no_grad():
        qat = tq.prepare_qat(model, _LAYOUTS[layout])
        qat(torch.randn(4, k, dtype=dtype))
        expected = qat[0].weight_fake_quant(qat[0].weight)
        layer = tq.convert(qat)[0]
    assert isinstance(layer, QuantizedLinear)
    assert layer.packed_int4 == layout.startswith(("int4", "uint4"))
    got = layer.dequantized_weight()
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", ["w4a8_dynamic", "w8a8_dynamic", "int4_per_group"])
def test_converted_forward_is_its_definition(name, bias, dtype):
    """The eager forward is F.linear of the reference fake-quantized input and weight, bit
    for bit (the same GEMM), with batch dims."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(96, 13, bias=bias)).to(dtype)
    x = torch.randn(2, 3, 96, dtype=dtype)
    with tq.use_backend("eager"), torch.no_grad():
        qat = tq.prepare_qat(model, name)
        qat(x)
        w = qat[0].weight_fake_quant(qat[0].weight)
        ifq = getattr(qat[0], "input_fake_quant", None)
        xin = x if ifq is None else _expected(x, ifq.per_token_spec())
        expected = F.linear(xin, w, None if model[0].bias is None else qat[0].bias)
        y = tq.convert(qat).eval()(x)
    assert y.dtype == dtype and y.shape == (2, 3, 13)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_shared_per_token_input_is_reused_only_while_unchanged():
    x = torch.randn(2, 5, 32)
    spec = _spec(False)
    first = fake_quantize_per_token_shared(x, spec)
    assert fake_quantize_per_token_shared(x, spec) is first  # q / k / v read one tensor
    torch.testing.assert_close(first, _expected(x, spec), rtol=0, atol=0)
    x[0, 0].mul_(3.0)  # an in-place change bumps the version counter
    changed = fake_quantize_per_token_shared(x, spec)
    torch.testing.assert_close(changed, _expected(x, spec), rtol=0, atol=0)
    assert fake_quantize_per_token_shared(x, _spec(True)) is not changed  # another spec
    assert fake_quantize_per_token_shared(x.clone(), spec) is not changed  # another tensor
    with torch.inference_mode():
        y = torch.randn(3, 32)
        a, b = fake_quantize_per_token_shared(y, spec), fake_quantize_per_token_shared(y, spec)
    assert a is not b  # no version counter: never reused
    torch.testing.assert_close(a, _expected(y, spec), rtol=0, atol=0)


def test_scratch_buffer_never_hands_back_another_inputs_result(monkeypatch):
    # With grad disabled the shared result lives in a per-thread scratch buffer that the next
    # call reuses: a call that is not memoized (an inference tensor) must drop the memo too.
    spec = _spec(True)
    x, other = torch.randn(64, 32), torch.randn(64, 32) * 7
    with torch.no_grad():
        first = fake_quantize_per_token_shared(x, spec)
        torch.testing.assert_close(first, _expected(x, spec), rtol=0, atol=0)
        with torch.inference_mode():
            fake_quantize_per_token_shared(other.clone(), spec)
        again = fake_quantize_per_token_shared(x, spec)
        torch.testing.assert_close(again, _expected(x, spec), rtol=0, atol=0)
        # Above the size cap: a fresh tensor each call, same values.
        monkeypatch.setattr(quantized_linear, "SCRATCH_MAX_ELEMENTS", 64 * 32 - 1)
        big = fake_quantize_per_token_shared(x.clone(), spec)
        assert big.data_ptr() != again.data_ptr()
        torch.testing.assert_close(big, _expected(x, spec), rtol=0, atol=0)


def test_converted_forward_with_and_without_scratch_and_public_input_kept():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(48, 24), torch.nn.GELU(), torch.nn.Linear(24, 7))
    x1, x2 = torch.randn(5, 48), torch.randn(5, 48)
    with tq.use_backend("eager"):
        qat = tq.prepare_qat(model, "w8a8_dynamic")
        with torch.no_grad():
            qat(x1)
        conv = tq.convert(qat).eval()
        fresh = conv(x1)  # grad enabled: no scratch
        with torch.no_grad():
            torch.testing.assert_close(conv(x1), fresh, rtol=0, atol=0)
            # The public method hands back its own tensor: later forwards leave it alone.
            kept = conv[0].fake_quantized_input(x1)
            before = kept.clone()
            conv(x2)
        torch.testing.assert_close(kept, before, rtol=0, atol=0)


def test_layers_reading_one_input_agree_with_separate_calls():
    torch.manual_seed(3)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(32, 8), "b": torch.nn.Linear(32, 5)})
    x = torch.randn(4, 32)
    with tq.use_backend("eager"), torch.no_grad():
        qat = tq.prepare_qat(model, "w4a8_dynamic")
        qat["a"](x), qat["b"](x)
        conv = tq.convert(qat).eval()
        ya, yb = conv["a"](x), conv["b"](x)
        # Each alone, on a fresh copy of the input: no memo in play.
        torch.testing.assert_close(ya, conv["a"](x.clone()), rtol=0, atol=0)
        torch.testing.assert_close(yb, conv["b"](x.clone()), rtol=0, atol=0)
