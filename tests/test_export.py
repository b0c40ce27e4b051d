"""tq.export_compressed_tensors: a tiny Llama (no download) prepared, trained a few QAT steps,
converted and exported; transformers loads the checkpoint with compressed-tensors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import triton_qat as tq
from triton_qat.flow.convert import QuantizedLinear
from triton_qat.flow.export import pack_int32

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
pytest.importorskip("safetensors")

# Presets whose per-token formula is the format's up to x / s against x * (1 / s) (below).
SYMMETRIC_PER_TOKEN = {"w8a8_dynamic"}


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _converted(qconfig: str) -> torch.nn.Module:
    ids = torch.randint(128, (2, 16), generator=torch.Generator().manual_seed(0))
    with tq.use_backend("eager"):
        model = tq.prepare_qat(_tiny_llama(), {"lm_head": None, "*": qconfig})
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return tq.convert(model.eval())


def _load(directory) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.mark.parametrize(
    "qconfig", ["w8a8_dynamic", "w4a8_dynamic", "int8_per_channel", "int4_per_group"]
)
def test_export_loads_in_transformers(qconfig, tmp_path):
    converted = _converted(qconfig)
    directory = tq.export_compressed_tensors(converted, tmp_path / "ckpt")
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["format"] == qc["format"]
    bits = group["weights"]["num_bits"]
    assert qc["format"] == ("int-quantized" if qconfig == "w8a8_dynamic" else "pack-quantized")
    assert bits == (4 if "4" in qconfig.split("_")[0] else 8)

    loaded = _load(directory)
    ids = torch.randint(128, (3, 24), generator=torch.Generator().manual_seed(1))
    with tq.use_backend("eager"), torch.no_grad():
        expected, got = converted(input_ids=ids).logits, loaded(input_ids=ids).logits
    # The loaded model decompresses its weights on its first forward.
    ours = {n: m for n, m in converted.named_modules() if isinstance(m, QuantizedLinear)}
    theirs = dict(loaded.named_modules())
    assert len(ours) == 14
    for name, layer in ours.items():
        assert torch.equal(theirs[name].weight, layer.dequantized_weight()), name
    assert torch.equal(theirs["lm_head"].weight, converted.lm_head.weight)
    if qconfig not in SYMMETRIC_PER_TOKEN:
        # Weight-only, or affine per token: the same numbers, bit for bit.
        assert torch.equal(got, expected)
        return
    # Symmetric per token: the format rounds x / s, triton_qat (torch's formula) x * (1 / s).
    # A row's negative extreme lands on the tie -127.5 and may round to -128 or -127: one
    # step of that row's input, here and there, which the later layers carry on.
    diff = (got - expected).abs().max().item()
    assert diff <= 0.02 * expected.abs().max().item(), diff


def test_symmetric_per_token_inputs_differ_by_one_step_at_ties():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    layer = _converted("w8a8_dynamic").model.layers[0].self_attn.q_proj
    x = torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(2))
    args = QuantizationArgs(num_bits=8, symmetric=True, strategy="token", dynamic=True)
    scale, zp = compute_dynamic_scales_and_zp(x, args, layer)
    theirs = fake_quantize(x, scale, zp, args)
    ours = layer.fake_quantized_input(x)
    differ = ours != theirs
    steps = ((ours - theirs).abs() / scale)[differ]
    torch.testing.assert_close(steps, torch.ones_like(steps))
    # Only at a tie: |x| / s within an ulp of k + 0.5.
    ratio = (x / scale)[differ]
    assert ((ratio.abs() - ratio.abs().floor() - 0.5).abs() < 1e-4).all()
    assert differ.sum() <= x.shape[0] * x.shape[1] // 2


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 40, 7])
def test_packing_is_the_formats(bits, k):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    lo = -(1 << (bits - 1))
    codes = torch.randint(lo, -lo, (5, k), generator=torch.Generator().manual_seed(k))
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes.to(torch.int8), bits))


def test_export_errors_leave_nothing_written(tmp_path):
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        tq.export_compressed_tensors(_tiny_llama(), tmp_path / "a")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        tq.export_compressed_tensors(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "b")
    converted = _converted("int8_per_channel")
    layer = converted.model.layers[1].mlp.down_proj
    layer.weight_zero_point = layer.weight_zero_point.float()
    with pytest.raises(ValueError, match=r"layer 'model.layers.1.mlp.down_proj': float weight"):
        tq.export_compressed_tensors(converted, tmp_path / "c")
    assert sorted(tmp_path.iterdir()) == []
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("x")
    layer.weight_zero_point = layer.weight_zero_point.to(torch.int32)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tq.export_compressed_tensors(converted, tmp_path / "d")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep"]
    tq.export_compressed_tensors(converted, tmp_path / "d", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_quantized_embedding_is_exported_as_its_dequantized_table(tmp_path):
    ids = torch.randint(128, (2, 16), generator=torch.Generator().manual_seed(0))
    recipe = {"lm_head": None, "model.embed_tokens": "embedding_int8", "*": "int4_per_group"}
    with tq.use_backend("eager"):
        model = tq.prepare_qat(_tiny_llama(), recipe)
        model(input_ids=ids, labels=ids).loss.backward()
        converted = tq.convert(model.eval())
    directory = tq.export_compressed_tensors(converted, tmp_path / "ckpt")
    loaded = _load(directory)
    with tq.use_backend("eager"), torch.no_grad():
        expected, got = converted(input_ids=ids).logits, loaded(input_ids=ids).logits
    table = converted.model.embed_tokens.dequantized_weight()
    assert torch.equal(loaded.model.embed_tokens.weight, table)
    assert torch.equal(got, expected)
