"""bench/bench_linear.py's FP8 rows, on the CPU: the torch composition that its eager_compiled
row times is the FP8 linear (forward and gradients), and the plan runs every FP8 provider.
The timing itself needs a GPU (bench/gpu_check.sh, GPU_CHECK_STEPS=formats)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from _compare import assert_bitwise_equal

import triton_qat as tq

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_linear(monkeypatch):
    pytest.importorskip("triton")  # bench_linear times with triton.testing (imported on use)
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("bench_linear")


@pytest.mark.parametrize("qconfig", ["fp8_dynamic", "fp8_weight_only"])
def test_fp8_composition_is_the_fp8_linear(bench_linear, qconfig):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(24, 64, generator=gen).to(torch.bfloat16)
    w0 = (torch.randn(40, 64, generator=gen) * 0.05).to(torch.bfloat16)
    b0 = torch.randn(40, generator=gen).to(torch.bfloat16)
    dy = torch.randn(24, 40, generator=gen).to(torch.bfloat16)
    results = []
    for run in (
        lambda x, w, b: bench_linear.fp8_composition(qconfig)(x, w, b),
        lambda x, w, b: tq.fp8_linear(x, w, b, **bench_linear.fp8_kwargs(qconfig)),
    ):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        with tq.use_backend("eager"):
            y = run(x, w, b)
            y.backward(dy)
        results.append((y, x.grad, w.grad, b.grad))
    for got, want in zip(*results, strict=True):
        assert_bitwise_equal(got, want)
    # the weight (and for fp8_dynamic the input) was fake-quantized: not the plain linear
    assert not torch.equal(results[0][0], torch.nn.functional.linear(x0, w0, b0))


def test_plan_runs_the_fp8_rows_with_their_floor(bench_linear):
    units = bench_linear.plan(True, ["fp8_dynamic", "fp8_weight_only"])
    assert units == [((8192, 4096, 4096), "fp8_dynamic"), ((8192, 4096, 4096), "fp8_weight_only")]
    for qconfig in bench_linear.FP8_QCONFIGS:
        for provider in bench_linear.PROVIDERS_BY_QCONFIG[qconfig]:
            assert provider in bench_linear.BUILDERS
    # run alone (gpu_check's bench_fp8), the FP8 rows still have torch_linear beside them
    assert bench_linear.TORCH_LINEAR in bench_linear.PROVIDERS_BY_QCONFIG["fp8_dynamic"]
