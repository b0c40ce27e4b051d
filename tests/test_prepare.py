"""prepare_qat's choice of what to quantize: patterns, module qconfig attributes, filter_fn,
errors before the model is touched, and the summary."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import triton_qat as tq


class Block(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for block in self.blocks:
            h = h + block.attn(h)
            h = h + block.mlp(h)
        return self.lm_head(h)


def _kinds(model: nn.Module) -> dict[str, str]:
    return {
        name: type(mod).__module__.split(".")[0] + "." + type(mod).__name__
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Embedding))
    }


def test_plain_qconfig_quantizes_every_linear_as_before():
    model = TinyLM()
    qat = tq.prepare_qat(model, "int8_per_channel")
    kinds = _kinds(qat)
    assert all(k == "triton_qat.Linear" for n, k in kinds.items() if n != "embed")
    assert kinds["embed"] == "torch.Embedding"  # embeddings only when a mapping asks
    assert _kinds(model)["lm_head"] == "torch.Linear"  # inplace=False: the original is intact
    summary = tq.qat_summary(qat)
    assert len(summary.quantized) == 7 and set(summary.quantized.values()) == {"int8_per_channel"}
    assert summary.kept_float == ["embed"]


def test_patterns_first_match_in_dict_order_decides():
    model = TinyLM()
    qat = tq.prepare_qat(
        model,
        {
            "lm_head": None,
            "blocks.0.*": None,
            "*.attn": "int8_per_tensor",
            "*.mlp.*": "int4_per_group",
        },
    )
    summary = tq.qat_summary(qat)
    assert summary.quantized == {
        "blocks.1.attn": "int8_per_tensor",
        "blocks.1.mlp.0": "int4_per_group",
        "blocks.1.mlp.2": "int4_per_group",
    }
    assert sorted(summary.kept_float) == [
        "blocks.0.attn",
        "blocks.0.mlp.0",
        "blocks.0.mlp.2",
        "embed",
        "lm_head",
    ]
    assert "3 QAT modules, 5 kept float" in str(summary)
    # Parameters are shared with the float modules they replace (inplace=True here).
    inplace = TinyLM()
    w = inplace.blocks[1].attn.weight
    tq.prepare_qat(inplace, {"blocks.1.attn": "int8_per_channel"}, inplace=True)
    assert inplace.blocks[1].attn.weight is w
    assert isinstance(inplace.blocks[1].attn, tq.nn.Linear)


def test_module_qconfig_attribute_overrides_and_propagates():
    model = TinyLM()
    model.blocks[0].qconfig = None  # the whole block stays float
    model.lm_head.qconfig = "int8_per_tensor"
    qat = tq.prepare_qat(model, "int8_per_channel")
    summary = tq.qat_summary(qat)
    assert summary.quantized["lm_head"] == "int8_per_tensor"
    assert summary.quantized["blocks.1.mlp.2"] == "int8_per_channel"
    assert {"blocks.0.attn", "blocks.0.mlp.0", "blocks.0.mlp.2"} <= set(summary.kept_float)


def test_filter_fn_keeps_modules_float():
    seen = []

    def only_mlp(mod: nn.Module, fqn: str) -> bool:
        seen.append((type(mod), fqn))
        return ".mlp." in fqn

    qat = tq.prepare_qat(TinyLM(), "int8_per_channel", filter_fn=only_mlp)
    assert sorted(tq.qat_summary(qat).quantized) == [
        "blocks.0.mlp.0",
        "blocks.0.mlp.2",
        "blocks.1.mlp.0",
        "blocks.1.mlp.2",
    ]
    assert (nn.Linear, "lm_head") in seen


@pytest.mark.parametrize(
    ("qconfig", "error", "words"),
    [
        ({"blocks.*.nothing": "int8_per_channel"}, ValueError, "blocks.*.nothing"),
        ({"lm_head": "no_such_qconfig"}, KeyError, "lm_head"),
        ({"*.attn": "int4_per_group", "*": None}, ValueError, "blocks.0.attn"),
        ({"lm_head": 3}, TypeError, "lm_head"),
    ],
)
def test_bad_choices_raise_before_the_model_is_touched(qconfig, error, words):
    model = TinyLM(d=48)  # 48 input features: int4 groups of 32 do not fit
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=words.replace("*", r"\*").replace(".", r"\.")):
        tq.prepare_qat(model, qconfig, inplace=True)
    assert _kinds(model) == _kinds(TinyLM(d=48))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_int4_on_48_features_names_group_size_and_module():
    with pytest.raises(ValueError, match=r"'lm_head'.*group_size"):
        tq.prepare_qat(TinyLM(d=48), {"lm_head": "int4_per_group"})


def test_embedding_with_input_quantization_is_refused_when_named():
    with pytest.raises(ValueError, match="embed"):
        tq.prepare_qat(TinyLM(), {"embed": "w8a8_dynamic"})
    # A wildcard's activation qconfig is for the Linears: the table stays float.
    summary = tq.qat_summary(tq.prepare_qat(TinyLM(), {"*": "w8a8_dynamic"}))
    assert summary.kept_float == ["embed"] and len(summary.quantized) == 7
    # A weight-only one quantizes the table too.
    summary = tq.qat_summary(tq.prepare_qat(TinyLM(), {"*": "int8_per_channel"}))
    assert summary.kept_float == [] and summary.quantized["embed"] == "int8_per_channel"


def test_prepared_model_trains():
    torch.manual_seed(0)
    model = tq.prepare_qat(TinyLM(), {"lm_head": None, "*": "int8_per_channel"})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    idx = torch.randint(0, 50, (4, 8))
    losses = []
    for _ in range(5):
        logits = model(idx)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), idx.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_embeddings_are_taken_when_the_mapping_asks():
    model = TinyLM()
    qat = tq.prepare_qat(
        model, {"embed": "embedding_int8", "lm_head": None, "*": "int8_per_channel"}
    )
    assert isinstance(qat.embed, tq.nn.Embedding)
    assert qat.embed.weight is not model.embed.weight  # a copy (inplace=False)
    summary = tq.qat_summary(qat)
    assert summary.quantized["embed"] == "embedding_int8"
    assert summary.kept_float == ["lm_head"]
    group = tq.prepare_qat(TinyLM(), {"embed": "int4_per_group"})
    assert isinstance(group.embed, tq.nn.Embedding)
    with pytest.raises(ValueError, match=r"'embed'.*group_size"):
        tq.prepare_qat(TinyLM(d=48), {"embed": "int4_per_group"})


def test_tied_embedding_and_head_share_one_parameter_after_prepare():
    model = TinyLM()
    model.lm_head.weight = model.embed.weight
    qat = tq.prepare_qat(model, {"embed": "int8_per_channel", "lm_head": "int8_per_channel"})
    assert isinstance(qat.embed, tq.nn.Embedding) and isinstance(qat.lm_head, tq.nn.Linear)
    assert qat.lm_head.weight is qat.embed.weight
