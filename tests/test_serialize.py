"""Converted models reloaded: the state_dict defines every QuantizedLinear (codes, qparams,
ranges, granularity, input quantizer), tq.save_converted / tq.load_converted through
safetensors, and the inference fake quant of dynamic per-token inputs."""

from __future__ import annotations

import pytest
import torch

import triton_qat as tq
from triton_qat.flow.convert import QuantizedEmbedding, QuantizedLinear
from triton_qat.numerics import reference
from triton_qat.quantizers import fake_quantize_per_token

PRESETS = [
    "w8a8_dynamic",
    "w4a8_dynamic",
    "int8_per_channel",
    "int4_per_group",
    "int8_per_tensor",
    "x86",
]


def _float_model(seed: int = 0, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(width, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False)
    )


def _converted(qconfig: str, float_model: torch.nn.Module) -> torch.nn.Module:
    with tq.use_backend("eager"):
        prepared = tq.prepare_qat(float_model, qconfig)
        opt = torch.optim.SGD(prepared.parameters(), lr=1e-2)
        for step in range(3):
            x = torch.randn(
                8, 5, float_model[0].in_features, generator=torch.Generator().manual_seed(step)
            )
            prepared(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return tq.convert(prepared).eval()


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(4, 7, model[0].in_features, generator=torch.Generator().manual_seed(9)) * 3
    with tq.use_backend("eager"), torch.no_grad():
        return model(x)


@pytest.mark.parametrize("qconfig", PRESETS)
def test_state_dict_rebuilds_bit_for_bit(qconfig):
    float_model = _float_model()
    converted = _converted(qconfig, float_model)
    saved = converted.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    with tq.use_backend("eager"):
        rebuilt = tq.convert(tq.prepare_qat(_float_model(seed=1), qconfig))
    rebuilt.load_state_dict(saved)
    assert torch.equal(_outputs(rebuilt), _outputs(converted))
    for a, b in zip(converted.modules(), rebuilt.modules(), strict=True):
        if isinstance(a, QuantizedLinear):
            assert (a.quant_min, a.quant_max, a.axis, a.group_size) == (
                b.quant_min,
                b.quant_max,
                b.axis,
                b.group_size,
            )
            assert (a.input_range, a.dynamic_input) == (b.input_range, b.dynamic_input)


@pytest.mark.parametrize("qconfig", ["w4a8_dynamic", "x86", "int4_per_group"])
def test_save_and_load_converted(qconfig, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    converted = _converted(qconfig, _float_model())
    directory = tq.save_converted(converted, tmp_path / "ckpt")
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors"]
    assert set(load_file(directory / "model.safetensors")) == set(converted.state_dict())
    # The float architecture alone: no qconfig, no prepare / convert.
    loaded = tq.load_converted(_float_model(seed=3), directory)
    assert torch.equal(_outputs(loaded), _outputs(converted))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tq.save_converted(converted, directory)
    tq.save_converted(converted, directory, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_load_converted_rejects_another_architecture(tmp_path):
    pytest.importorskip("safetensors")
    directory = tq.save_converted(_converted("w8a8_dynamic", _float_model()), tmp_path / "c")
    wider = _float_model(width=32)
    with pytest.raises(ValueError, match="another architecture"):
        tq.load_converted(wider, directory)
    assert type(wider[0]) is torch.nn.Linear  # the model passed in is left as it was
    other = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.GELU())
    with pytest.raises(ValueError, match=r"has (no module|a GELU) there"):
        tq.load_converted(other, directory)
    # load_state_dict itself names the layer.
    rebuilt = tq.convert(tq.prepare_qat(_float_model(width=32), "w8a8_dynamic"))
    with pytest.raises(RuntimeError, match=r"0: saved qweight has shape"):
        rebuilt.load_state_dict(_converted("w8a8_dynamic", _float_model()).state_dict())


def test_save_converted_refuses_a_float_model(tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(ValueError, match="no quantized layer"):
        tq.save_converted(_float_model(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_layout_survives_a_dtype_cast():
    converted = _converted("w8a8_dynamic", _float_model())
    spec = converted[0].dynamic_input
    state = converted.half().state_dict()
    assert state["0.input_layout"].dtype == torch.int64
    rebuilt = tq.convert(tq.prepare_qat(_float_model(), "int8_per_channel"))
    rebuilt.load_state_dict(state)
    assert rebuilt[0].dynamic_input == spec


@pytest.mark.parametrize("symmetric", [True, False])
def test_inference_per_token_fake_quant_equals_the_reference(symmetric):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=gen) * torch.logspace(-8, 4, 64).view(-1, 1)
    x[3, 5] = float("inf")
    x[4, 0] = float("-inf")
    x[5, 7] = float("nan")
    x[6] = 0.0
    x[7, :4] = 3e38
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    spec_args = (-128, 127, symmetric, 0, float(torch.finfo(torch.float32).eps))
    scale, zp = reference.per_token_qparams_ref(x, *spec_args)
    fast = reference.fake_quantize_rows_fp32(x, scale, zp, -128, 127)
    with tq.use_backend("eager"):
        expected = fake_quantize_per_token(x, -128, 127, qscheme, torch.qint8)
    torch.testing.assert_close(fast, expected, rtol=0, atol=0, equal_nan=True)


class _Embedder(torch.nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(40, 64, padding_idx=0)
        self.proj = torch.nn.Linear(64, 16)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(idx))


@pytest.mark.parametrize("embedding_qconfig", ["embedding_int8", "int4_per_group"])
def test_embeddings_rebuild_and_reload(embedding_qconfig, tmp_path):
    recipe = {"embed": embedding_qconfig, "proj": "int8_per_channel"}
    idx = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(2))
    with tq.use_backend("eager"):
        prepared = tq.prepare_qat(_Embedder(), recipe)
        prepared(idx).square().mean().backward()
        converted = tq.convert(prepared).eval()
        expected = converted(idx)
        rebuilt = tq.convert(tq.prepare_qat(_Embedder(seed=1), recipe))
        rebuilt.load_state_dict(converted.state_dict())
        assert torch.equal(rebuilt(idx), expected)
        if pytest.importorskip("safetensors"):
            directory = tq.save_converted(converted, tmp_path / "ckpt")
            loaded = tq.load_converted(_Embedder(seed=2), directory)
            assert isinstance(loaded.embed, QuantizedEmbedding)
            assert torch.equal(loaded(idx), expected)
            assert torch.equal(
                loaded.embed.dequantized_weight(), rebuilt.embed.dequantized_weight()
            )
