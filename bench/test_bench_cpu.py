"""CPU micro-benchmark: tq.fq_linear (eager backend) against torch.ao's composition.

    python -m pytest bench/test_bench_cpu.py --benchmark-only   # pytest-benchmark's table
    python bench/test_bench_cpu.py                              # the same, then the ratio

Both sides run one training step of an int8 per-channel fake-quantized linear, fp32, x (256, 512)
and w (512, 512): forward, then y.backward(dy), with grads for x, w and b. torch.ao's side is
what torch.ao.nn.qat.Linear computes once its observer has fixed the qparams:
F.linear(x, torch.fake_quantize_per_channel_affine(w, ...), b). Both tests share one benchmark
group, so the table lists them side by side with their ratios. Both run on one torch thread
(THREADS). Each first checks that the two agree. Not part of the test suite: pyproject's
testpaths is ["tests"].
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

pytest.importorskip("pytest_benchmark")
if importlib.util.find_spec("triton_qat") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton_qat as tq

M, N, K = 256, 512, 512
# One thread: the ratio then measures the work each side does, and stays put on a shared
# machine (with two threads under load it swung from 1.5x to 6x here).
THREADS = 1
QUANT_MIN, QUANT_MAX = -128, 127
GROUP = f"fq_linear_cpu_fp32_{M}x{N}x{K}_int8_per_channel_fwd_bwd"
TQ_TEST = "test_tq_fq_linear_eager"
TORCH_TEST = "test_torch_ao_composition"


def make_operands() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * K**-0.5
    return {
        "x": torch.randn(M, K, generator=gen),
        "w": w,
        "b": torch.randn(N, generator=gen) * 0.1,
        "dy": torch.randn(M, N, generator=gen),
        # Symmetric int8 per output channel: scale = row abs max / 127, zero point 0.
        "scale": (w.abs().amax(dim=1) / 127).clamp_min(1e-8),
        "zero_point": torch.zeros(N, dtype=torch.int32),
    }


def tq_linear(ops: dict[str, Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    qp = tq.QParams(ops["scale"], ops["zero_point"], QUANT_MIN, QUANT_MAX, axis=0)

    def linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return tq.fq_linear(x, w, b, weight_qparams=qp)

    return linear


def torch_ao_linear(ops: dict[str, Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    scale, zp = ops["scale"], ops["zero_point"]

    def linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        wq = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, QUANT_MIN, QUANT_MAX)
        return F.linear(x, wq, b)

    return linear


def training_step(
    linear: Callable[[Tensor, Tensor, Tensor], Tensor], ops: dict[str, Tensor]
) -> tuple[Callable[[], None], list[Tensor]]:
    """linear(x, w, b).backward(dy) on fresh leaves; grads reset before each step."""
    leaves = [ops[k].detach().clone().requires_grad_() for k in ("x", "w", "b")]
    dy = ops["dy"]

    def step() -> None:
        for t in leaves:
            t.grad = None
        linear(*leaves).backward(dy)

    return step, leaves


def outputs(linear, ops: dict[str, Tensor]) -> list[Tensor]:
    """y, dx, dw, db of one step."""
    step, leaves = training_step(linear, ops)
    step()
    with torch.no_grad():
        y = linear(*leaves)
    return [y, *(t.grad for t in leaves)]


@pytest.fixture(scope="module", autouse=True)
def fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def operands() -> dict[str, Tensor]:
    return make_operands()


@pytest.fixture(scope="module")
def agreed(operands) -> None:
    """The two sides compute the same thing, or there is nothing to compare."""
    with tq.use_backend("eager"):
        got = outputs(tq_linear(operands), operands)
    want = outputs(torch_ao_linear(operands), operands)
    for name, a, b in zip(("y", "dx", "dw", "db"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.benchmark(group=GROUP)
def test_tq_fq_linear_eager(benchmark, operands, agreed) -> None:
    step, _ = training_step(tq_linear(operands), operands)
    with tq.use_backend("eager"):  # forward and backward both dispatch under it
        benchmark(step)


@pytest.mark.benchmark(group=GROUP)
def test_torch_ao_composition(benchmark, operands, agreed) -> None:
    step, _ = training_step(torch_ao_linear(operands), operands)
    benchmark(step)


def print_ratio() -> int:
    """Run both benchmarks through pytest, then print tq eager / torch.ao composition."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        rc = pytest.main(
            [__file__, "--benchmark-only", f"--benchmark-json={report}", "-p", "no:cacheprovider"]
        )
        if rc != 0 or not report.exists():
            print(f"test_bench_cpu: pytest exited {int(rc)}; no ratio", file=sys.stderr)
            return int(rc) or 1
        stats = {b["name"]: b["stats"] for b in json.loads(report.read_text())["benchmarks"]}
    tq_s, ao_s = stats[TQ_TEST], stats[TORCH_TEST]
    print(
        f"x ({M}, {K}) @ w ({N}, {K})^T, fp32, int8 per channel, forward+backward, "
        f"{THREADS} thread(s), torch {torch.__version__}"
    )
    for stat in ("median", "min"):
        print(
            f"tq eager / torch.ao composition: {tq_s[stat] / ao_s[stat]:.2f}x ({stat}: "
            f"{tq_s[stat] * 1e6:.0f} us vs {ao_s[stat] * 1e6:.0f} us)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(print_ratio())
