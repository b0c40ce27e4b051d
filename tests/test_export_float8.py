"""tq.export_compressed_tensors for FP8 layers (fp8_dynamic, fp8_weight_only): a tiny Llama
(no download) prepared, trained a few QAT steps, converted and exported as "float-quantized";
transformers loads it with compressed-tensors."""

from __future__ import annotations

import json

import pytest
import torch

import triton_qat as tq
from triton_qat.flow.convert_float8 import QuantizedFloat8Linear
from triton_qat.quantizers import Float8FakeQuantize

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
pytest.importorskip("safetensors")

from test_export import _load, _tiny_llama  # noqa: E402 (after the importorskips)


def _converted(recipe: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    ids = torch.randint(128, (2, 16), generator=torch.Generator().manual_seed(0))
    with tq.use_backend("eager"):
        model = tq.prepare_qat(
            _tiny_llama(), {"lm_head": None, "model.embed_tokens": None, **recipe}
        ).to(dtype)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return tq.convert(model.eval())


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(128, (3, 24), generator=torch.Generator().manual_seed(1))
    with tq.use_backend("eager"), torch.no_grad():
        return model(input_ids=ids).logits


def _fp8_layers(model: torch.nn.Module) -> dict[str, QuantizedFloat8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedFloat8Linear)}


FLOAT8 = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None}


@pytest.mark.parametrize("qconfig", ["fp8_dynamic", "fp8_weight_only"])
def test_fp8_export_loads_in_transformers(qconfig, tmp_path):
    converted = _converted({"*": qconfig})
    ours = _fp8_layers(converted)
    assert len(ours) == 14
    directory = tq.export_compressed_tensors(converted, tmp_path / "ckpt")
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["format"] == "float-quantized"
    assert group["targets"] == ["Linear"]
    assert group["weights"] == FLOAT8 | {"strategy": "channel", "dynamic": False}
    inputs = FLOAT8 | {"strategy": "token", "dynamic": True}
    assert group["input_activations"] == (inputs if qconfig == "fp8_dynamic" else None)

    from safetensors.torch import load_file

    stored = load_file(directory / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert stored[f"{q}.weight"].dtype == torch.float8_e4m3fn
    assert stored[f"{q}.weight_scale"].dtype == torch.float32
    assert stored[f"{q}.weight_scale"].shape == (64, 1)
    assert torch.equal(stored[f"{q}.weight"].view(torch.uint8), ours[q].qweight.view(torch.uint8))

    loaded = _load(directory)
    expected, got = _logits(converted), _logits(loaded)
    # The loaded model decompresses its weights (codes * scale, fp32) on its first forward.
    theirs = dict(loaded.named_modules())
    for name, layer in ours.items():
        assert torch.equal(theirs[name].weight, layer.dequantized_weight()), name
    # fp32: the format's per-token scale (max |x| / 448, in fp32) and fake quant (x / s,
    # clamp, cast to float8_e4m3fn, times s) are triton_qat's: the same logits, bit for bit.
    assert torch.equal(got, expected)
    if qconfig == "fp8_dynamic":
        # ... and the input quantizer ran on both sides (without it the logits move).
        for layer in ours.values():
            layer.input_granularity = None
        assert not torch.equal(_logits(converted), got)


def test_per_tensor_fp8_weight_exports(tmp_path):
    per_tensor = tq.QConfig(
        weight=Float8FakeQuantize.with_args(granularity="per_tensor"),
        activation=Float8FakeQuantize.with_args(granularity="per_token"),
    )
    converted = _converted({"*": per_tensor})
    directory = tq.export_compressed_tensors(converted, tmp_path / "ckpt")
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["weights"]["strategy"] == "tensor"
    loaded = _load(directory)
    expected, got = _logits(converted), _logits(loaded)
    theirs = dict(loaded.named_modules())
    for name, layer in _fp8_layers(converted).items():
        assert torch.equal(theirs[name].weight, layer.dequantized_weight()), name
    assert torch.equal(got, expected)


def test_int8_and_fp8_layers_export_as_mixed_precision(tmp_path):
    converted = _converted({"*.self_attn.*": "fp8_dynamic", "*": "int8_per_channel"})
    directory = tq.export_compressed_tensors(converted, tmp_path / "ckpt")
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    groups = sorted(qc["config_groups"].values(), key=lambda g: g["format"])
    assert [g["format"] for g in groups] == ["float-quantized", "pack-quantized"]
    assert len(groups[0]["targets"]) == 8 and len(groups[1]["targets"]) == 6
    loaded = _load(directory)
    expected, got = _logits(converted), _logits(loaded)
    theirs = dict(loaded.named_modules())
    for name, layer in converted.named_modules():
        if hasattr(layer, "dequantized_weight") and name != "model.embed_tokens":
            assert torch.equal(theirs[name].weight, layer.dequantized_weight()), name
    assert torch.equal(got, expected)


def test_bf16_model_differs_by_the_formats_bf16_scales(tmp_path):
    """A bf16 model: the loaded model keeps its scales in bf16 (compressed-tensors makes
    weight_scale in the weight's dtype) and quantizes each token in bf16 arithmetic (scale
    max |x| / 448 rounded to bf16, x / s rounded to bf16 before the float8 cast, q * s in
    bf16); triton_qat keeps fp32 scales and fp32 arithmetic. Both formulas checked exactly."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    converted = _converted({"*": "fp8_dynamic"}, torch.bfloat16)
    directory = tq.export_compressed_tensors(converted, tmp_path / "ckpt")
    loaded = _load(directory)
    expected, got = _logits(converted), _logits(loaded)
    assert got.dtype == expected.dtype == torch.bfloat16
    theirs = dict(loaded.named_modules())
    for name, layer in _fp8_layers(converted).items():
        codes, scale = layer.qweight.float(), layer.weight_scale
        assert torch.equal(theirs[name].weight, (codes * scale.bfloat16().float()).bfloat16())
    layer = converted.model.layers[0].self_attn.q_proj
    args = QuantizationArgs(
        num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True
    )
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2)).bfloat16() * 3
    scale, zp = compute_dynamic_scales_and_zp(x, args, layer)
    assert scale.dtype == torch.bfloat16
    amax = x.abs().amax(dim=-1, keepdim=True)
    assert torch.equal(scale, amax / torch.tensor(448.0, dtype=torch.bfloat16))
    v = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(fake_quantize(x, scale, zp, args), v.bfloat16() * scale)
    # Measured on this model: a few percent of the largest logit.
    diff = (got.float() - expected.float()).abs().max().item()
    assert 0 < diff <= 0.05 * expected.float().abs().max().item(), diff


def test_what_the_format_cannot_express_is_an_error_before_writing(tmp_path):
    e5m2 = tq.QConfig(
        weight=Float8FakeQuantize.with_args(dtype=torch.float8_e5m2, granularity="per_row"),
        activation=Float8FakeQuantize.with_args(granularity="per_token"),
    )
    converted = _converted({"model.layers.1.mlp.down_proj": e5m2, "*": "fp8_dynamic"})
    with pytest.raises(
        ValueError, match=r"layer 'model.layers.1.mlp.down_proj': weight format float8_e5m2"
    ):
        tq.export_compressed_tensors(converted, tmp_path / "a")
    wide_eps = tq.QConfig(
        weight=Float8FakeQuantize.with_args(granularity="per_row"),
        activation=Float8FakeQuantize.with_args(granularity="per_token", eps=1e-4),
    )
    converted = _converted({"model.layers.0.self_attn.o_proj": wide_eps, "*": "fp8_dynamic"})
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.o_proj': input eps"):
        tq.export_compressed_tensors(converted, tmp_path / "b")
    assert sorted(tmp_path.iterdir()) == []
