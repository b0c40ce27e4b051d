"""MX (mxfp8_*, mxfp4_*) and NVFP4 (nvfp4_*) layers converted: the weight's codes as the format
stores them with their block scales (and NVFP4's tensor scale), equal to the QAT layer's eval
output bit for bit; the state_dict, save_converted and load_converted rebuild them bit for bit;
a cast keeps codes and scales."""

from __future__ import annotations

import pytest
import torch
from _compare import assert_bitwise_equal

import triton_qat as tq
from triton_qat.flow.convert_microscaling import (
    QuantizedMicroscalingLinear,
    pack_e2m1,
    unpack_e2m1,
)
from triton_qat.numerics.microscaling import (
    MX_FORMATS,
    fake_quantize_mx_ref,
    fake_quantize_nvfp4_ref,
    mx_scale_codes_ref,
    mx_scale_ref,
    nvfp4_block_scale_ref,
    nvfp4_tensor_scale_ref,
)
from triton_qat.quantizers import Float8FakeQuantize, MXFakeQuantize, NVFP4FakeQuantize

PRESETS = [
    "mxfp8_dynamic",
    "mxfp8_weight_only",
    "mxfp4_dynamic",
    "mxfp4_weight_only",
    "nvfp4_dynamic",
    "nvfp4_weight_only",
]
DTYPES = [torch.float32, torch.bfloat16]


def _float_model(seed: int = 0, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(width, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False)
    )


def _trained(qconfig, float_model: torch.nn.Module, dtype=torch.float32) -> torch.nn.Module:
    prepared = tq.prepare_qat(float_model.to(dtype), qconfig)
    opt = torch.optim.SGD(prepared.parameters(), lr=1e-2)
    for step in range(2):
        x = torch.randn(8, 5, 64, generator=torch.Generator().manual_seed(step)).to(dtype)
        prepared(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    return prepared.eval()


def _input(dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(9)) * 3
    x[0, 0] = 0.0  # a zero token: zero blocks
    x[1, 2, :32] *= 1e-3
    return x.to(dtype)


def _fake_weight_ref(layer_fq, weight: torch.Tensor) -> torch.Tensor:
    """The numerics module's fake quant of the weight (the oracle the codes must reproduce)."""
    if isinstance(layer_fq, NVFP4FakeQuantize):
        return fake_quantize_nvfp4_ref(
            weight, layer_fq.block_size, layer_fq.per_tensor_scale, layer_fq.eps
        )
    return fake_quantize_mx_ref(weight, MX_FORMATS[layer_fq.fmt], layer_fq.block_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", PRESETS)
def test_converted_layers_equal_the_qat_eval_output_bit_for_bit(name, dtype):
    qat = _trained(name, _float_model(), dtype)
    x = _input(dtype)
    with torch.no_grad():
        expected = qat(x)
        fake = [_fake_weight_ref(m.weight_fake_quant, m.weight) for m in (qat[0], qat[2])]
        weights = [m.weight.detach().clone() for m in (qat[0], qat[2])]
    converted = tq.convert(qat)
    layers = [converted[0], converted[2]]
    assert all(type(m) is QuantizedMicroscalingLinear for m in layers)
    assert not any(isinstance(m, (MXFakeQuantize, NVFP4FakeQuantize)) for m in converted.modules())
    with torch.no_grad():
        assert_bitwise_equal(converted(x), expected, name)
    fmt = name.split("_")[0]
    for layer, fq, w in zip(layers, fake, weights, strict=True):
        n, k = layer.out_features, layer.in_features
        assert_bitwise_equal(layer.dequantized_weight(), fq, f"{name} weight")
        assert layer.weight_format == fmt
        if fmt == "mxfp8":
            assert layer.qweight.dtype == torch.float8_e4m3fn and layer.qweight.shape == (n, k)
            # torch's own cast of w / X (saturated) gives the same codes.
            x_scale = mx_scale_ref(w, MX_FORMATS["mxfp8"], 32).repeat_interleave(32, dim=1)
            codes = (w.float() / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            assert torch.equal(layer.qweight.view(torch.uint8), codes.view(torch.uint8))
        else:
            assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (n, k // 2)
        if fmt == "nvfp4":
            assert layer.weight_scale.dtype == torch.float8_e4m3fn
            assert layer.weight_scale.shape == (n, k // 16)
            s_t = nvfp4_tensor_scale_ref(w)
            assert_bitwise_equal(layer.weight_tensor_scale, s_t.reshape(1), "tensor scale")
            s_b = nvfp4_block_scale_ref(w, 16, s_t)
            assert_bitwise_equal(layer.weight_scale.float(), s_b, "block scales")
        else:
            assert layer.weight_scale.dtype == torch.uint8 and layer.weight_scale.shape == (
                n,
                k // 32,
            )
            assert torch.equal(layer.weight_scale, mx_scale_codes_ref(w, MX_FORMATS[fmt], 32))
            assert layer.weight_tensor_scale is None
        assert (layer.input_quant is None) == name.endswith("weight_only")


def test_input_quantizer_is_the_presets():
    dynamic = tq.convert(_trained("nvfp4_dynamic", _float_model()))
    weight_only = tq.convert(_trained("mxfp4_weight_only", _float_model()))
    fmt, block_size, per_tensor, eps = dynamic[0].input_quant
    assert (fmt, block_size, per_tensor) == ("nvfp4", 16, True)
    assert eps == torch.tensor(NVFP4FakeQuantize().eps, dtype=torch.float32).item()
    assert weight_only[0].input_quant is None
    x = _input()
    assert torch.equal(weight_only[0].fake_quantized_input(x), x)
    assert_bitwise_equal(dynamic[0].fake_quantized_input(x), fake_quantize_nvfp4_ref(x, 16))


def test_a_disabled_input_quantizer_converts_to_weight_only():
    qat = _trained("mxfp8_dynamic", _float_model())
    for m in (qat[0], qat[2]):
        m.input_fake_quant.disable_fake_quant()
    with torch.no_grad():
        expected = qat(_input())
        converted = tq.convert(qat)
        assert converted[0].input_quant is None
        assert_bitwise_equal(converted(_input()), expected)


def _special_weight(k: int = 64) -> torch.Tensor:
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(4))
    w[0, :32] = 0.0  # a zero block
    w[0, 3] = -0.0
    w[1, :32] *= 2.0**-130  # fp32 subnormals: MX scale 2**-127
    w[2, 5] = 7.9  # saturates in MXFP4 (7.9 / 4 > 1.75)
    w[3, 40] = float("inf")
    return w


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("block_size", [32, 8])
def test_special_values_convert_as_the_fake_quant(fmt, block_size):
    """Zero, -0, subnormal, saturating and inf blocks: the stored codes give the fake quant's
    values bit for bit (NaN where it is NaN: MX an inf block, NVFP4 the whole tensor)."""
    if fmt == "nvfp4":
        wfq = NVFP4FakeQuantize.with_args(block_size=block_size)
    else:
        wfq = MXFakeQuantize.with_args(fmt=fmt, block_size=block_size)
    linear = torch.nn.Linear(64, 6)
    with torch.no_grad():
        linear.weight.copy_(_special_weight())
    qat = tq.prepare_qat(torch.nn.Sequential(linear), tq.QConfig(weight=wfq)).eval()
    expected = _fake_weight_ref(qat[0].weight_fake_quant, qat[0].weight.detach())
    layer = tq.convert(qat)[0]
    assert_bitwise_equal(layer.dequantized_weight(), expected, fmt)
    if fmt != "nvfp4":
        assert int(layer.weight_scale[3, 40 // block_size]) == 255  # e8m0 NaN
        assert int(layer.weight_scale[1, 0]) == 0  # 2**-127


def test_an_odd_in_features_packs_with_a_pad_nibble():
    qconfig = tq.QConfig(weight=MXFakeQuantize.with_args(fmt="mxfp4", block_size=1))
    qat = tq.prepare_qat(torch.nn.Sequential(torch.nn.Linear(7, 5)), qconfig).eval()
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = qat(x)
    layer = tq.convert(qat)[0]
    assert layer.qweight.shape == (5, 4)
    assert int((layer.qweight[:, -1] >> 4).max()) == 0
    with torch.no_grad():
        assert_bitwise_equal(layer(x), expected)


def test_e2m1_packing_round_trips_every_code():
    values = unpack_e2m1(torch.arange(256, dtype=torch.uint8).reshape(1, 256), 512)
    assert values.shape == (1, 512)
    assert torch.equal(pack_e2m1(values), torch.arange(256, dtype=torch.uint8).reshape(1, 256))
    # Low nibble first: code 0x71 holds 0.5 then 6.
    assert unpack_e2m1(torch.tensor([[0x71]], dtype=torch.uint8), 2).tolist() == [[0.5, 6.0]]
    assert torch.signbit(unpack_e2m1(torch.tensor([[0x08]], dtype=torch.uint8), 1)).all()


@pytest.mark.parametrize("name", PRESETS)
def test_state_dict_rebuilds_bit_for_bit(name):
    converted = tq.convert(_trained(name, _float_model()))
    saved = converted.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    assert saved["0.microscaling_layout"].dtype == torch.int64
    assert ("0.weight_tensor_scale" in saved) == name.startswith("nvfp4")
    # Rebuilt from another microscaling layout: the saved one is adopted.
    other = "nvfp4_weight_only" if not name.startswith("nvfp4") else "mxfp8_dynamic"
    rebuilt = tq.convert(tq.prepare_qat(_float_model(seed=1), other))
    rebuilt.load_state_dict(saved)
    with torch.no_grad():
        assert_bitwise_equal(rebuilt(_input()), converted(_input()), name)
    for a, b in ((converted[0], rebuilt[0]), (converted[2], rebuilt[2])):
        assert (a.weight_format, a.block_size, a.input_quant) == (
            b.weight_format,
            b.block_size,
            b.input_quant,
        )
        assert a.qweight.dtype == b.qweight.dtype and a.weight_scale.dtype == b.weight_scale.dtype


def test_a_state_dict_of_another_width_is_an_error_naming_the_layer():
    saved = tq.convert(_trained("mxfp4_dynamic", _float_model())).state_dict()
    other = tq.convert(tq.prepare_qat(_float_model(width=32), "mxfp4_dynamic"))
    with pytest.raises(RuntimeError, match=r"0: saved qweight is torch.uint8 \(96, 32\)"):
        other.load_state_dict(saved)
    bad = dict(saved)
    bad["0.microscaling_layout"] = torch.tensor([7, 32, 0, -1, 0, 0, 0])
    with pytest.raises(RuntimeError, match="0: microscaling_layout: weight format code 7"):
        tq.convert(tq.prepare_qat(_float_model(), "mxfp4_dynamic")).load_state_dict(bad)


@pytest.mark.parametrize("name", ["mxfp8_dynamic", "mxfp4_weight_only", "nvfp4_dynamic"])
def test_save_and_load_converted(name, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    converted = tq.convert(_trained(name, _float_model()))
    directory = tq.save_converted(converted, tmp_path / "ckpt")
    stored = load_file(directory / "model.safetensors")
    assert stored["0.qweight"].dtype == converted[0].qweight.dtype
    assert stored["0.weight_scale"].dtype == converted[0].weight_scale.dtype
    loaded = tq.load_converted(_float_model(seed=3), directory)
    assert isinstance(loaded[2], QuantizedMicroscalingLinear)
    with torch.no_grad():
        assert_bitwise_equal(loaded(_input()), converted(_input()), name)
    assert_bitwise_equal(loaded[0].dequantized_weight(), converted[0].dequantized_weight())
    with pytest.raises(ValueError, match=r"0: saved qweight is torch"):
        tq.load_converted(_float_model(width=32), directory)


def test_int8_fp8_and_nvfp4_layers_reload_together(tmp_path):
    pytest.importorskip("safetensors")
    model = torch.nn.Sequential(_float_model(), torch.nn.Linear(32, 48))
    recipe = {"0.0": "fp8_dynamic", "0.2": "nvfp4_dynamic", "1": "w8a8_dynamic"}
    with tq.use_backend("eager"):
        qat = tq.prepare_qat(model, recipe).eval()
        converted = tq.convert(qat)
        directory = tq.save_converted(converted, tmp_path / "ckpt")
        loaded = tq.load_converted(
            torch.nn.Sequential(_float_model(seed=5), torch.nn.Linear(32, 48)), directory
        )
        kinds = [type(m).__name__ for m in (loaded[0][0], loaded[0][2], loaded[1])]
        assert kinds == ["QuantizedFloat8Linear", "QuantizedMicroscalingLinear", "QuantizedLinear"]
        with torch.no_grad():
            assert_bitwise_equal(loaded(_input()), converted(_input()))


@pytest.mark.parametrize("name", ["mxfp8_dynamic", "mxfp4_dynamic", "nvfp4_weight_only"])
def test_a_cast_keeps_codes_and_scales(name):
    converted = tq.convert(_trained(name, _float_model()))
    layer = converted[0]
    stored = {n: getattr(layer, n) for n in ("qweight", "weight_scale", "weight_tensor_scale")}
    stored = {n: t.clone() for n, t in stored.items() if t is not None}
    expected = layer.dequantized_weight().to(torch.bfloat16)
    converted.to(torch.bfloat16)
    for n, t in stored.items():
        assert_bitwise_equal(getattr(layer, n), t, n)
    assert layer.weight_dtype == torch.bfloat16
    assert_bitwise_equal(layer.dequantized_weight(), expected)
    with torch.no_grad():
        assert converted(_input(torch.bfloat16)).dtype == torch.bfloat16
    converted.float()
    assert layer.weight_dtype == torch.float32
    assert layer.microscaling_layout.dtype == torch.int64


def test_mixed_quantizers_are_not_converted():
    int_weight = tq.QConfig(
        weight=tq.get_qconfig("int8_per_channel").weight,
        activation=MXFakeQuantize.with_args(fmt="mxfp8"),
    )
    with pytest.raises(NotImplementedError, match="MX / NVFP4 input quantizer"):
        tq.convert(tq.prepare_qat(_float_model(), int_weight))
    int_input = tq.QConfig(
        weight=NVFP4FakeQuantize.with_args(),
        activation=tq.get_qconfig("w8a8_dynamic").activation,
    )
    with pytest.raises(NotImplementedError, match="nvfp4 weight with a DynamicPerToken"):
        tq.convert(tq.prepare_qat(_float_model(), int_input))
    fp8_input = tq.QConfig(
        weight=NVFP4FakeQuantize.with_args(),
        activation=Float8FakeQuantize.with_args(granularity="per_token"),
    )
    with pytest.raises(NotImplementedError, match="FP8 input quantizer with a NVFP4Fake"):
        tq.convert(tq.prepare_qat(_float_model(), fp8_input))


def test_bad_constructor_arguments_name_the_argument():
    codes = torch.zeros(4, 32, dtype=torch.uint8)
    scales = torch.zeros(4, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"qweight must be torch\.float8_e4m3fn"):
        QuantizedMicroscalingLinear(32, 4, "mxfp8", 32, codes, scales, None)
    with pytest.raises(ValueError, match="weight_format must be one of"):
        QuantizedMicroscalingLinear(32, 4, "mxfp6", 32, codes, scales, None)
    with pytest.raises(ValueError, match="needs its weight_tensor_scale"):
        QuantizedMicroscalingLinear(32, 4, "nvfp4", 16, codes[:, :16], scales, None)
    with pytest.raises(ValueError, match="block size 24 does not divide in_features 32"):
        QuantizedMicroscalingLinear(32, 4, "mxfp4", 24, codes[:, :16], scales, None)


def _tiny_llama(dtype: torch.dtype) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", PRESETS)
def test_llama_converts_bit_for_bit(name, dtype):
    recipe = {"lm_head": None, "model.embed_tokens": None, "*": name}
    qat = tq.prepare_qat(_tiny_llama(dtype), recipe)
    ids = torch.randint(128, (2, 12), generator=torch.Generator().manual_seed(0))
    qat.train()
    qat(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(qat.parameters(), lr=1e-2).step()
    qat.eval()
    ids = torch.randint(128, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = qat(input_ids=ids).logits
        converted = tq.convert(qat)
        got = converted(input_ids=ids).logits
    layers = [m for m in converted.modules() if isinstance(m, QuantizedMicroscalingLinear)]
    assert len(layers) == 7
    assert_bitwise_equal(got, expected, f"{name} {dtype}")
