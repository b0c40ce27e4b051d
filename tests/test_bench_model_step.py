"""bench/bench_model_step.py on the CPU: every variant prepares the model it names, the rows
and their ratios are what the run measured, and the budget and the missing-CUDA exit hold.
The figures themselves need a GPU (bench/gpu_check.sh, GPU_CHECK_STEPS=training)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from _compare import assert_bitwise_equal

import triton_qat as tq

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_model_step")


def _model(bench):
    return bench.build_model(bench.TINY, 1, 16, "cpu", torch.bfloat16)


@pytest.mark.parametrize("variant", ["tq_w4a8_dynamic", "tq_int8_per_channel"])
def test_triton_qat_variants_quantize_the_decoder_linears_only(bench, variant):
    model = bench.prepare(_model(bench), variant)
    qat = [n for n, m in model.named_modules() if isinstance(m, tq.nn.Linear)]
    assert len(qat) == 7 and all(n.startswith("model.layers.0.") for n in qat)
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_torchao_variant_fake_quantizes_as_w4a8_dynamic(bench):
    """torchao's 8da4w QAT linear and triton_qat's w4a8_dynamic (eager backend) give a layer's
    output bit for bit: the two rows time the same numerics."""
    pytest.importorskip("torchao.quantization.qat")
    ours = bench.prepare(_model(bench).float(), "tq_w4a8_dynamic")
    theirs = bench.prepare(_model(bench).float(), "torchao_8da4w")
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        layer_ours = ours.model.layers[0].get_submodule(name)
        layer_theirs = theirs.model.layers[0].get_submodule(name)
        assert type(layer_theirs) is not torch.nn.Linear  # torchao's fake-quantized linear
        assert_bitwise_equal(layer_ours.weight, layer_theirs.weight, name)
        x = torch.randn(6, layer_ours.in_features, generator=torch.Generator().manual_seed(0))
        with tq.use_backend("eager"), torch.no_grad():
            y_ours, y_theirs = layer_ours(x), layer_theirs(x)
        assert_bitwise_equal(y_ours, y_theirs, name)
        assert not torch.equal(y_ours, x @ layer_ours.weight.T)  # quantized, not float


def test_rows_and_ratios_are_the_runs(bench, tmp_path, capsys):
    rc = bench.main(
        ["--device", "cpu", "--tiny", "--layers", "1", "--seq", "16", "--warmup", "2",
         "--steps", "1", "--mode", "eager", "--variant", "float", "--variant",
         "tq_w4a8_dynamic", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    record = json.loads((tmp_path / "model_step.json").read_text())
    rows = {r["variant"]: r for r in record["rows"]}
    assert set(rows) == {"float", "tq_w4a8_dynamic"}
    base, qat = rows["float"], rows["tq_w4a8_dynamic"]
    assert base["step_vs_float"] == 1.0
    assert qat["step_vs_float"] == pytest.approx(qat["step_ms"] / base["step_ms"], rel=1e-12)
    assert qat["tokens_per_s"] == pytest.approx(16 / (qat["step_ms"] / 1e3), rel=1e-12)
    assert base["peak_gib"] is None  # no memory figure on the CPU
    # The same initial weights and tokens: QAT's first loss near float's, not equal.
    assert abs(qat["first_loss"] - base["first_loss"]) < 0.05
    assert qat["first_loss"] != base["first_loss"]
    assert "tq_w4a8_dynamic" in capsys.readouterr().out


def test_budget_leaves_later_rows_out(bench, tmp_path):
    rc = bench.main(
        ["--device", "cpu", "--tiny", "--layers", "1", "--seq", "16", "--warmup", "2",
         "--steps", "1", "--mode", "eager", "--variant", "float", "--variant",
         "tq_int8_per_channel", "--budget-s", "0", "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    rows = json.loads((tmp_path / "model_step.json").read_text())["rows"]
    assert [r.get("skipped") for r in rows] == ["out of budget", "out of budget"]


def test_plan_puts_float_first_in_each_mode(bench):
    plan = bench.plan(["torchao_8da4w", "float", "tq_w4a8_dynamic"], ["compiled", "eager"])
    assert plan == [
        ("float", "eager"),
        ("tq_w4a8_dynamic", "eager"),
        ("torchao_8da4w", "eager"),
        ("float", "compiled"),
        ("tq_w4a8_dynamic", "compiled"),
        ("torchao_8da4w", "compiled"),
    ]


def test_cuda_asked_without_cuda_exits_2(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert bench.main(["--device", "cuda", "--tiny"]) == bench.EXIT_UNAVAILABLE
    assert "no CUDA device" in capsys.readouterr().err


def test_too_few_warmup_steps_is_an_error(bench):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--tiny", "--warmup", "1"])
