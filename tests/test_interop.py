"""What users combine with QAT: peft's LoRA adapters on tq.nn.Linear (QAT-LoRA), merged and
converted; transformers' Trainer, its checkpoints and their resume; a transformers model
throughout (tiny, built from a config: nothing downloaded)."""

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


def _train_steps(model: torch.nn.Module, steps: int = 3) -> tuple[list[float], dict, dict]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return losses, grads, state


@pytest.mark.parametrize("qconfig", ["x86", "int8_per_channel", "int8_per_channel_lsq"])
def test_activation_checkpointing_trains_as_without(qconfig):
    # Recomputed forwards (in backward) must not update the observers a second time: the
    # same losses, gradients and fake-quant state, bit for bit, as without checkpointing.
    plain = tq.prepare_qat(tiny_llama(), {"lm_head": None, "*": qconfig}).train()
    ckpt = tq.prepare_qat(tiny_llama(), {"lm_head": None, "*": qconfig}).train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.is_gradient_checkpointing
    a, b = _train_steps(plain), _train_steps(ckpt)
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name
    for key in a[2]:
        assert torch.equal(a[2][key], b[2][key]), key


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_torch_checkpoint_does_not_observe_twice(use_reentrant):
    model = tq.prepare_qat(torch.nn.Sequential(torch.nn.Linear(16, 16)), "x86")
    model(torch.randn(4, 16))  # the moving averages start from a first observation
    x = torch.randn(4, 16, requires_grad=True) * 3
    observer = model[0].input_fake_quant.activation_post_process
    before = observer.min_val.clone()
    y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=use_reentrant)
    after_forward = observer.min_val.clone()
    y.sum().backward()
    assert not torch.equal(before, after_forward)  # the forward observed
    assert torch.equal(observer.min_val, after_forward)  # the recompute did not


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def test_trainer_checkpoints_and_resumes_a_qat_model(tmp_path):
    """transformers' Trainer trains a prepared model (the examples' recipe, QAT embedding
    included) and checkpoints it; a freshly prepared model resumed from the checkpoint holds
    its weights, qparams and observer state bit for bit, and trains on."""
    st = pytest.importorskip("safetensors.torch")
    recipe = {"lm_head": None, "model.embed_tokens": "embedding_int8", "*": "w4a8_dynamic"}

    def trainer(model, max_steps):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, save_steps=2, learning_rate=1e-3,
            per_device_train_batch_size=4, use_cpu=True, report_to=[], save_only_model=False,
        )  # fmt: skip
        return transformers.Trainer(model=model, args=args, train_dataset=_Tokens())

    qat = tq.prepare_qat(tiny_llama(), recipe)
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    trainer(qat, 2).train()
    saved = st.load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    state = qat.state_dict()
    assert set(saved) == set(state)
    for key, value in state.items():
        assert torch.equal(saved[key], value), key
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(state[key], before[key])  # it trained
    fresh = tq.prepare_qat(tiny_llama(seed=1), recipe)
    resumed = trainer(fresh, 3)
    resumed._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 3
