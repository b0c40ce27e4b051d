"""tq.export_compressed_tensors for MX / NVFP4 layers: a tiny bf16 Llama (no download) prepared
with the weight-only presets, trained a few QAT steps, converted and exported as
"mxfp8-quantized", "mxfp4-pack-quantized" and "nvfp4-pack-quantized"; transformers loads and
runs it on the CPU with compressed-tensors, weights and logits equal to ours bit for bit. What
the format cannot express is a ValueError naming the layer, raised before anything is written."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _compare import assert_bitwise_equal

import triton_qat as tq
from triton_qat.flow.convert_microscaling import QuantizedMicroscalingLinear
from triton_qat.flow.export_microscaling import export_microscaling_layer
from triton_qat.numerics.microscaling import MX_FORMATS, mx_scale_ref
from triton_qat.quantizers import MXFakeQuantize

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
pytest.importorskip("safetensors")

from test_export import _load, _tiny_llama  # noqa: E402 (after the importorskips)

WEIGHT_ONLY = {
    "mxfp8_weight_only": ("mxfp8-quantized", 8, "group", 32, "torch.uint8"),
    "mxfp4_weight_only": ("mxfp4-pack-quantized", 4, "group", 32, "torch.uint8"),
    "nvfp4_weight_only": ("nvfp4-pack-quantized", 4, "tensor_group", 16, "torch.float8_e4m3fn"),
}


def _bf16_llama() -> torch.nn.Module:
    model = _tiny_llama()
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    # from_pretrained(dtype bf16) keeps the rotary inv_freq in fp32; a cast model has it in
    # bf16, which alone moves the logits (test_a_bf16_rotary_table_alone_moves_the_logits).
    rotary.inv_freq = inv_freq
    return model


def _converted(recipe: dict, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    ids = torch.randint(128, (2, 16), generator=torch.Generator().manual_seed(0))
    base = _bf16_llama() if dtype == torch.bfloat16 else _tiny_llama()
    with tq.use_backend("eager"):
        model = tq.prepare_qat(base, {"lm_head": None, "model.embed_tokens": None, **recipe})
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return tq.convert(model.eval())


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(128, (3, 24), generator=torch.Generator().manual_seed(1))
    with tq.use_backend("eager"), torch.no_grad():
        return model(input_ids=ids).logits


def _layers(model: torch.nn.Module) -> dict[str, QuantizedMicroscalingLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedMicroscalingLinear)}


@pytest.mark.parametrize("qconfig", list(WEIGHT_ONLY))
def test_weight_only_export_loads_and_runs_bit_for_bit(qconfig, tmp_path):
    from compressed_tensors.quantization import QuantizationArgs
    from safetensors.torch import load_file

    fmt, bits, strategy, group_size, scale_dtype = WEIGHT_ONLY[qconfig]
    converted = _converted({"*": qconfig})
    ours = _layers(converted)
    assert len(ours) == 14
    differing = {n: export_microscaling_layer(m, n)[2] for n, m in ours.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        directory = tq.export_compressed_tensors(converted, tmp_path / "ckpt")
    warned = [w for w in caught if "NVFP4 weights" in str(w.message)]
    assert len(warned) == (1 if any(differing.values()) else 0)
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["format"] == fmt and group["input_activations"] is None
    args = QuantizationArgs(**group["weights"])
    assert (args.num_bits, args.type, args.strategy, args.group_size) == (
        bits,
        "float",
        strategy,
        group_size,
    )
    assert str(args.scale_dtype) == scale_dtype and args.symmetric and not args.dynamic

    stored = load_file(directory / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    codes = stored[f"{q}.weight" if bits == 8 else f"{q}.weight_packed"]
    assert codes.dtype == ours[q].qweight.dtype
    assert torch.equal(codes.view(torch.uint8), ours[q].qweight.view(torch.uint8))
    assert_bitwise_equal(stored[f"{q}.weight_scale"], ours[q].weight_scale)
    assert (f"{q}.weight_global_scale" in stored) == qconfig.startswith("nvfp4")

    loaded = _load(directory)
    expected, got = _logits(converted), _logits(loaded)
    # The loaded model decompresses its weights (to bf16) on its first forward: ours, bit for
    # bit, except (NVFP4) the weights at bf16 ties that export counted, one bf16 step each.
    theirs = dict(loaded.named_modules())
    for name, layer in ours.items():
        w, mine = (
            theirs[name].weight.view(torch.int16),
            layer.dequantized_weight().view(torch.int16),
        )
        assert int((w != mine).sum()) == differing[name], name
        assert int((w.int() - mine.int()).abs().max()) <= 1, name
    if not any(differing.values()):
        assert qconfig.startswith("mx")  # MX scales are powers of two: nothing to round
        assert_bitwise_equal(got, expected, qconfig)
    else:
        diff = (got.float() - expected.float()).abs().max().item()
        assert 0 < diff <= 0.02 * expected.float().abs().max().item(), diff


def test_a_bf16_rotary_table_alone_moves_the_logits(tmp_path):
    """A model cast with .to(torch.bfloat16) has its rotary inv_freq in bf16, transformers'
    from_pretrained keeps it fp32: the logits move by that alone (measured, not the format)."""
    converted = _converted({"*": "mxfp4_weight_only"})
    directory = tq.export_compressed_tensors(converted, tmp_path / "ckpt")
    got = _logits(_load(directory))
    assert torch.equal(got, _logits(converted))
    rotary = converted.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.bfloat16()
    diff = (got.float() - _logits(converted).float()).abs().max().item()
    assert 0 < diff <= 0.02 * got.float().abs().max().item(), diff


def test_nvfp4_global_scale_is_the_neighbour_that_reproduces_the_weights():
    """Where the fp32 nearest 1 / s_t decodes (compressed-tensors' own decompressor) to other
    bf16 weights than ours, the exported global scale is a neighbour that gives ours."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**WEIGHT_ONLY_ARGS["nvfp4_weight_only"]),
    )

    def decompress(layer, g):
        state = {"weight_packed": layer.qweight, "weight_scale": layer.weight_scale}
        state["weight_global_scale"] = g
        return NVFP4PackedCompressor.decompress(state, scheme)["weight"]

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 128, generator=gen) * torch.exp(
        2 * torch.randn(64, 8, 1, generator=gen)
    ).repeat_interleave(16, 1).reshape(64, 128)
    for factor in torch.linspace(1, 2, 300).tolist():
        linear = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False)).to(torch.bfloat16)
        with torch.no_grad():
            linear[0].weight.copy_(base * factor)
        layer = tq.convert(tq.prepare_qat(linear, "nvfp4_weight_only").eval())[0]
        nearest = 1.0 / layer.weight_tensor_scale
        if torch.equal(decompress(layer, nearest), layer.dequantized_weight()):
            continue
        mismatches = int((decompress(layer, nearest) != layer.dequantized_weight()).sum())
        _, tensors, differing = export_microscaling_layer(layer, "x")
        g = tensors["weight_global_scale"]
        assert not torch.equal(g, nearest) and differing < mismatches
        # The count is the real decompressor's: the format's decode is emulated exactly.
        assert int((decompress(layer, g) != layer.dequantized_weight()).sum()) == differing
        return
    pytest.fail("no weight scaling found where the nearest global scale decodes differently")


WEIGHT_ONLY_ARGS = {
    "nvfp4_weight_only": {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": 16,
        "strategy": "tensor_group",
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn",
    }
}


def test_int8_fp8_and_nvfp4_layers_export_as_mixed_precision(tmp_path):
    recipe = {
        "*.self_attn.*": "fp8_dynamic",
        "*.mlp.gate_proj": "int8_per_channel",
        "*.mlp.*": "nvfp4_weight_only",
    }
    converted = _converted(recipe)
    directory = tq.export_compressed_tensors(converted, tmp_path / "ckpt")
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    groups = sorted(qc["config_groups"].values(), key=lambda g: g["format"])
    assert [g["format"] for g in groups] == [
        "float-quantized",
        "nvfp4-pack-quantized",
        "pack-quantized",
    ]
    assert [len(g["targets"]) for g in groups] == [8, 4, 2]
    loaded = _load(directory)
    expected, got = _logits(converted), _logits(loaded)
    theirs = dict(loaded.named_modules())
    for name, layer in _layers(converted).items():
        assert_bitwise_equal(theirs[name].weight, layer.dequantized_weight(), name)
    # The int8 and FP8 layers differ in bf16 as their own tests say (the format's bf16 scales
    # and bf16 per-token arithmetic); measured on this model: a few percent of the largest logit.
    diff = (got.float() - expected.float()).abs().max().item()
    assert 0 < diff <= 0.05 * expected.float().abs().max().item(), diff


def test_the_formats_dynamic_mx_scale_is_not_triton_qats():
    """Why mxfp*_dynamic is not exported: the format's dynamic MX block scale rounds the block
    amax to a power of two upward from a mantissa of 1.75; OCP MX (triton_qat) floors it."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = QuantizationArgs(
        num_bits=4,
        type="float",
        strategy="group",
        group_size=32,
        dynamic=True,
        scale_dtype=torch.uint8,
    )
    x = torch.full((2, 32), 0.25)
    x[0, 0], x[1, 0] = 7.0, 5.0  # amax 1.75 * 4 and 1.25 * 4
    scale, _ = compute_dynamic_scales_and_zp(x, args, torch.nn.Linear(32, 1))
    ours = mx_scale_ref(x, MX_FORMATS["mxfp4"], 32)
    assert scale.flatten().tolist() == [2.0, 1.0]
    assert ours.flatten().tolist() == [1.0, 1.0]


def test_what_the_format_cannot_express_is_an_error_before_writing(tmp_path):
    cases = [
        (
            {"*": "mxfp4_dynamic"},
            torch.bfloat16,
            r"'model.layers.0.self_attn.q_proj': dynamic mxfp4",
        ),
        ({"*": "nvfp4_dynamic"}, torch.bfloat16, r"input global scale is static"),
        ({"*": "mxfp8_weight_only"}, torch.float32, r"q_proj': torch.float32 weights; the format"),
        (
            {
                "model.layers.1.mlp.up_proj": tq.QConfig(
                    weight=MXFakeQuantize.with_args(fmt="mxfp4", block_size=16)
                ),
                "*": "mxfp4_weight_only",
            },
            torch.bfloat16,
            r"'model.layers.1.mlp.up_proj': mxfp4 blocks of 16; the format's mxfp4 groups are 32",
        ),
    ]
    for i, (recipe, dtype, message) in enumerate(cases):
        converted = _converted(recipe, dtype)
        with pytest.raises(ValueError, match=message):
            tq.export_compressed_tensors(converted, tmp_path / f"ckpt{i}")
    converted = _converted({"*": "mxfp8_weight_only"})
    converted.model.layers[1].self_attn.v_proj.weight_scale[3, 1] = 255
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.v_proj': a NaN block scale"):
        tq.export_compressed_tensors(converted, tmp_path / "nan")
    assert sorted(tmp_path.iterdir()) == []
