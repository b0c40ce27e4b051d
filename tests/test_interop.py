"""What users combine with QAT: peft's LoRA adapters on tq.nn.Linear (QAT-LoRA), merged and
converted; a transformers model throughout (tiny, built from a config: nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

import triton_qat as tq

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

RECIPE = {"lm_head": None, "model.layers.*": "w4a8_dynamic"}


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(autouse=True)
def _eager():
    # Module-level interop; the kernels under these layers are tested on their own.
    with tq.use_backend("eager"):
        yield


def test_qat_lora_trains_adapters_over_a_frozen_fake_quantized_base():
    qat = tq.prepare_qat(tiny_llama(), RECIPE)
    lora = peft.get_peft_model(
        qat,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    q_proj = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, tq.nn.Linear)
    base_weights = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" not in n}
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    # The base layer's output is the fused fake-quant linear's: the adapter adds to it.
    x = torch.randn(3, 64)
    with torch.no_grad():
        base = q_proj.base_layer
        assert torch.equal(q_proj.base_layer(x), base(x))
        delta = q_proj.lora_B["default"](q_proj.lora_A["default"](x)) * q_proj.scaling["default"]
        torch.testing.assert_close(q_proj(x), base(x) + delta, rtol=0, atol=1e-6)

    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = lora(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in lora.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_weights[n]), n  # the base stayed frozen

    # merge_and_unload folds the adapters into the tq.nn.Linear weights, then convert.
    a = q_proj.lora_A["default"].weight.detach().clone()
    b = q_proj.lora_B["default"].weight.detach().clone()
    w0 = q_proj.base_layer.weight.detach().clone()
    merged = lora.merge_and_unload()
    merged_q = merged.model.layers[0].self_attn.q_proj
    assert isinstance(merged_q, tq.nn.Linear)
    torch.testing.assert_close(merged_q.weight, w0 + (b @ a) * 2.0, rtol=0, atol=1e-6)
    merged.eval()
    with torch.no_grad():
        logits_qat = merged(input_ids=ids).logits
        converted = tq.convert(merged)
        assert isinstance(
            converted.model.layers[0].self_attn.q_proj, tq.flow.convert.QuantizedLinear
        )
        logits_int = converted(input_ids=ids).logits
    # Same dequantized weights and input codes: equal up to fp32 matmul rounding.
    torch.testing.assert_close(logits_int, logits_qat, rtol=1e-5, atol=1e-5)
