"""FP8 layers (fp8_dynamic, fp8_weight_only) converted: float8 codes with the scales the fake
quant used, equal to the QAT layer's eval output bit for bit; the state_dict, save_converted
and load_converted rebuild them bit for bit."""

from __future__ import annotations

import pytest
import torch

import triton_qat as tq
from triton_qat.flow.convert_float8 import QuantizedFloat8Linear
from triton_qat.quantizers import Float8FakeQuantize

FP8_PRESETS = ["fp8_dynamic", "fp8_weight_only"]


def _fp8_qconfig(weight: str, inputs: str | None, dtype=torch.float8_e4m3fn) -> tq.QConfig:
    return tq.QConfig(
        weight=Float8FakeQuantize.with_args(dtype=dtype, granularity=weight),
        activation=None
        if inputs is None
        else Float8FakeQuantize.with_args(dtype=dtype, granularity=inputs),
    )


QCONFIGS = {
    "fp8_dynamic": "fp8_dynamic",
    "fp8_weight_only": "fp8_weight_only",
    "per_tensor_weight": _fp8_qconfig("per_tensor", "per_token"),
    "per_tensor_input": _fp8_qconfig("per_row", "per_tensor"),
    "e5m2": _fp8_qconfig("per_row", "per_token", torch.float8_e5m2),
}


def _float_model(seed: int = 0, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(width, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False)
    )


def _trained(qconfig, float_model: torch.nn.Module) -> torch.nn.Module:
    prepared = tq.prepare_qat(float_model, qconfig)
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    for step in range(3):
        x = torch.randn(8, 5, 64, generator=torch.Generator().manual_seed(step))
        prepared(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return prepared.eval()


def _input(dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(9)) * 3
    x[0, 0] = 0.0  # a zero token: its scale is eps / 448, its output the bias
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("name", list(QCONFIGS))
def test_converted_equals_the_qat_eval_output_bit_for_bit(name, backend):
    """On the Triton path (auto: the interpreter here) both run tq.fp8_linear's forward kernels
    (the FP8 GEMM for fp8_dynamic), the converted layer on its stored codes; on the eager
    backend both are F.linear of the reference's fake-quantized operands."""
    qat = _trained(QCONFIGS[name], _float_model())
    with torch.no_grad(), tq.use_backend(backend):
        expected = qat(_input())
        fake_weights = [m.weight_fake_quant(m.weight) for m in (qat[0], qat[2])]
    converted = tq.convert(qat)
    layers = [converted[0], converted[2]]
    assert all(type(m) is QuantizedFloat8Linear for m in layers)
    assert not any(isinstance(m, Float8FakeQuantize) for m in converted.modules())
    with torch.no_grad(), tq.use_backend(backend):
        got = converted(_input())
    assert torch.equal(_bits(got), _bits(expected))
    for layer, fake in zip(layers, fake_weights, strict=True):
        dtype = torch.float8_e5m2 if name == "e5m2" else torch.float8_e4m3fn
        assert layer.qweight.dtype == dtype
        rows = 1 if name == "per_tensor_weight" else layer.out_features
        assert layer.weight_scale.shape == (rows, 1)
        assert torch.equal(_bits(layer.dequantized_weight()), _bits(fake))
    # The weight's scale is its row amax / fmax, as the fake quant made it.
    w = qat[0].weight.detach()
    if name in ("fp8_dynamic", "fp8_weight_only"):
        scale = torch.clamp(w.abs().amax(dim=1, keepdim=True), min=1e-12) / 448.0
        assert torch.equal(_bits(layers[0].weight_scale), _bits(scale))
        codes = (w / scale).to(torch.float8_e4m3fn)  # torch's own cast, saturation not needed
        assert torch.equal(layers[0].qweight.view(torch.uint8), codes.view(torch.uint8))


def test_input_quantizer_is_the_presets():
    dynamic = tq.convert(_trained("fp8_dynamic", _float_model()))
    weight_only = tq.convert(_trained("fp8_weight_only", _float_model()))
    assert (dynamic[0].input_granularity, dynamic[0].input_format.name) == (
        "per_token",
        "float8_e4m3fn",
    )
    assert weight_only[0].input_granularity is None
    x = _input()
    assert torch.equal(weight_only[0].fake_quantized_input(x), x)
    assert not torch.equal(dynamic[0].fake_quantized_input(x), x)


@pytest.mark.parametrize("name", list(QCONFIGS))
def test_state_dict_rebuilds_bit_for_bit(name):
    converted = tq.convert(_trained(QCONFIGS[name], _float_model()))
    saved = converted.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    assert saved["0.float8_layout"].dtype == torch.int64
    # Rebuilt from another FP8 layout: the saved one (format, granularity, input) is adopted.
    other = "fp8_weight_only" if name != "fp8_weight_only" else QCONFIGS["per_tensor_weight"]
    rebuilt = tq.convert(tq.prepare_qat(_float_model(seed=1), other))
    rebuilt.load_state_dict(saved)
    with torch.no_grad():
        assert torch.equal(_bits(rebuilt(_input())), _bits(converted(_input())))
    for a, b in zip(converted.modules(), rebuilt.modules(), strict=True):
        if isinstance(a, QuantizedFloat8Linear):
            assert (a.weight_format, a.per_row, a.input_granularity, a.input_format) == (
                b.weight_format,
                b.per_row,
                b.input_granularity,
                b.input_format,
            )
            assert a.qweight.dtype == b.qweight.dtype
            assert torch.equal(a.qweight.view(torch.uint8), b.qweight.view(torch.uint8))


@pytest.mark.parametrize("name", ["fp8_dynamic", "fp8_weight_only", "per_tensor_weight"])
def test_save_and_load_converted(name, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    converted = tq.convert(_trained(QCONFIGS[name], _float_model()))
    directory = tq.save_converted(converted, tmp_path / "ckpt")
    stored = load_file(directory / "model.safetensors")
    assert stored["0.qweight"].dtype == torch.float8_e4m3fn
    assert stored["0.weight_scale"].dtype == torch.float32
    loaded = tq.load_converted(_float_model(seed=3), directory)
    assert isinstance(loaded[2], QuantizedFloat8Linear)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = _input(dtype)
            assert torch.equal(_bits(loaded(x.float())), _bits(converted(x.float())))
    assert torch.equal(
        _bits(loaded[0].dequantized_weight()), _bits(converted[0].dequantized_weight())
    )
    # A checkpoint of another width is an error naming the layer; the model is left alone.
    with pytest.raises(ValueError, match=r"0: saved qweight is torch.float8_e4m3fn \(96, 64\)"):
        tq.load_converted(_float_model(width=32), directory)


def test_int8_and_fp8_layers_reload_together(tmp_path):
    pytest.importorskip("safetensors")
    recipe = {"0": "fp8_dynamic", "2": "w8a8_dynamic"}
    with tq.use_backend("eager"):
        converted = tq.convert(_trained(recipe, _float_model()))
        directory = tq.save_converted(converted, tmp_path / "ckpt")
        loaded = tq.load_converted(_float_model(seed=3), directory)
        assert type(loaded[0]).__name__ == "QuantizedFloat8Linear"
        assert type(loaded[2]).__name__ == "QuantizedLinear"
        with torch.no_grad():
            assert torch.equal(_bits(loaded(_input())), _bits(converted(_input())))


def test_a_cast_keeps_codes_and_scales():
    converted = tq.convert(_trained("fp8_dynamic", _float_model()))
    layer = converted[0]
    codes, scale = layer.qweight.clone(), layer.weight_scale.clone()
    expected = layer.dequantized_weight().to(torch.bfloat16)
    converted.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.qweight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(_bits(layer.weight_scale), _bits(scale))
    assert layer.weight_dtype == torch.bfloat16
    assert torch.equal(_bits(layer.dequantized_weight()), _bits(expected))
    with torch.no_grad():
        assert converted(_input(torch.bfloat16)).dtype == torch.bfloat16
    converted.float()
    assert layer.weight_dtype == torch.float32
    assert layer.float8_layout.dtype == torch.int64


def test_bf16_qat_layer_converts_bit_for_bit():
    qat = _trained("fp8_dynamic", _float_model()).to(torch.bfloat16)
    with torch.no_grad():
        expected = qat(_input(torch.bfloat16))
        converted = tq.convert(qat)
        got = converted(_input(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert converted[0].weight_scale.dtype == torch.float32
    assert torch.equal(_bits(got), _bits(expected))


def test_fp8_input_with_an_integer_weight_is_not_converted():
    qconfig = tq.QConfig(
        weight=tq.get_qconfig("int8_per_channel").weight,
        activation=Float8FakeQuantize.with_args(granularity="per_token"),
    )
    qat = tq.prepare_qat(_float_model(), qconfig)
    with pytest.raises(NotImplementedError, match="FP8 input quantizer"):
        tq.convert(qat)


def test_a_disabled_input_quantizer_converts_to_weight_only():
    """fp8_dynamic with the input fake quant disabled is weight-only: the QAT layer runs the
    fused weight-only FP8 linear, and the converted layer keeps no input quantizer."""
    qat = _trained(QCONFIGS["fp8_dynamic"], _float_model())
    for m in (qat[0], qat[2]):
        m.input_fake_quant.disable_fake_quant()
    with torch.no_grad():
        expected = qat(_input())
        layer = qat[0]
        plain = tq.fp8_linear(_input(), layer.weight, layer.bias, input_dtype=None)
        assert torch.equal(_bits(layer(_input())), _bits(plain))
        converted = tq.convert(qat)
        assert converted[0].input_granularity is None
        assert torch.equal(_bits(converted(_input())), _bits(expected))
