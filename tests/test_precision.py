"""Precision as LLM trainers set it: a prepared model cast to bf16 / fp16 afterwards, autocast,
checkpoints of either dtype. The quantizers' state stays float32 whatever the model is cast to,
so "prepare, then cast" trains exactly as "cast, then prepare"."""

from __future__ import annotations

import pytest
import torch
from _compare import assert_bitwise_equal
from torch import nn

import triton_qat as tq

PRESETS = tq.list_qconfigs()
# Dynamic scales only (float formats): no floating state in their fake-quant modules.
STATELESS = {
    "fp8_dynamic",
    "fp8_weight_only",
    *(
        f"{fmt}_{kind}"
        for fmt in ("mxfp8", "mxfp4", "nvfp4")
        for kind in ("dynamic", "weight_only")
    ),
}


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))


def _state_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """dtype of every floating tensor that belongs to a fake-quant module or observer."""
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and "fake_quant" in name:
            out[name] = t.dtype
    return out


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    y = model(x)
    y.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", PRESETS)
def test_prepare_then_cast_equals_cast_then_prepare(preset, dtype):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with tq.use_backend("eager"):
        after = tq.prepare_qat(_mlp(), preset).to(dtype)
        before = tq.prepare_qat(_mlp().to(dtype), preset)
        states = _state_dtypes(after)
        assert states or preset in STATELESS
        assert set(states.values()) <= {torch.float32}, states
        assert _state_dtypes(before) == states
        for _ in range(2):  # observers update on each step
            y_a, g_a = _step(after, x)
            y_b, g_b = _step(before, x)
            assert y_a.dtype == dtype
            assert_bitwise_equal(y_a, y_b, f"{preset} output")
            assert g_a.keys() == g_b.keys()
            for name in g_a:
                assert_bitwise_equal(g_a[name], g_b[name], f"{preset} grad {name}")
        for (name, a), (_, b) in zip(
            after.state_dict().items(), before.state_dict().items(), strict=True
        ):
            assert_bitwise_equal(a, b, f"{preset} state {name}")


def test_cast_keeps_device_moves_and_learnable_parameters_float32():
    model = tq.prepare_qat(_mlp(), "int8_per_channel_lsq").half()
    fq = model[0].weight_fake_quant
    assert fq.scale.dtype == torch.float32 and isinstance(fq.scale, nn.Parameter)
    assert model[0].weight.dtype == torch.float16
    # .to(device) with a dtype still moves everything and casts only the layer's tensors.
    model = model.to("cpu", torch.bfloat16)
    assert fq.scale.dtype == torch.float32 and model[0].weight.dtype == torch.bfloat16


def test_bf16_learnable_parameters_still_work():
    # A mixed-precision wrapper (FSDP2's param_dtype) may hand the fake quant bf16 qparams.
    model = tq.prepare_qat(_mlp(), "int8_per_channel_lsq").to(torch.bfloat16)
    x = torch.randn(4, 64).to(torch.bfloat16)
    model(x)  # observer initialises the qparams
    fq = model[0].weight_fake_quant
    fq.scale.data = fq.scale.data.to(torch.bfloat16)
    fq.zero_point.data = fq.zero_point.data.to(torch.bfloat16)
    with tq.use_backend("eager"):
        model(x).float().sum().backward()
    assert fq.scale.grad is not None and fq.scale.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["int8_per_channel", "w4a8_dynamic", "x86"])
def test_checkpoints_load_either_way(preset):
    x = torch.randn(5, 64)
    with tq.use_backend("eager"):
        fp32 = tq.prepare_qat(_mlp(), preset)
        fp32(x)  # observed: buffers hold real values
        bf16 = tq.prepare_qat(_mlp(seed=3), preset).to(torch.bfloat16)
        bf16.load_state_dict(fp32.state_dict())
        assert set(_state_dtypes(bf16).values()) <= {torch.float32}
        for name, t in bf16.state_dict().items():
            ref = fp32.state_dict()[name]
            if "fake_quant" in name or not t.is_floating_point():
                assert_bitwise_equal(t, ref, name)
            else:
                assert_bitwise_equal(t, ref.to(torch.bfloat16), name)
        # and back: a bf16 model's checkpoint loads into an fp32 one
        again = tq.prepare_qat(_mlp(seed=4), preset)
        again.load_state_dict(bf16.state_dict())
        for name, t in again.state_dict().items():
            if "fake_quant" in name:
                assert_bitwise_equal(t, fp32.state_dict()[name], name)


def test_autocast_training_step():
    model = tq.prepare_qat(_mlp(), "w8a8_dynamic")
    x = torch.randn(8, 64)
    with tq.use_backend("eager"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32
    assert set(_state_dtypes(model).values()) == {torch.float32}
