"""Determinism: the same inputs give bitwise the same outputs and gradients, run after run.

No kernel accumulates with atomics (each output tile is reduced by one program in a fixed
order), so results depend only on the inputs and the kernel config. On a GPU the config is
the autotuner's pick: fixed within a process, and across processes once it is cached (or
with TRITON_QAT_AUTOTUNE=0). With TRITON_QAT_TEST_DEVICE=cuda (bench/gpu_check.sh) the
shapes grow so that many programs run at once.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from _compare import assert_bitwise_equal

import triton_qat as tq

KERNELS = Path(tq.__file__).parent / "kernels"


def _shape(device) -> tuple[int, int, int]:
    # (M, N, K): small under the interpreter, a few hundred tiles when compiled.
    return (1536, 1024, 768) if torch.device(device).type == "cuda" else (17, 20, 64)


def _fwd_bwd(device, dtype, wqp_kind: str, x_fq: bool):
    m, n, k = _shape(device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g).to(dtype).to(device).requires_grad_()
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(device).requires_grad_()
    b = torch.randn(n, generator=g).to(dtype).to(device).requires_grad_()
    dy = torch.randn(m, n, generator=g).to(dtype).to(device)
    if wqp_kind == "channel":
        wqp = tq.QParams(
            torch.full((n,), 0.002, device=device),
            torch.zeros(n, dtype=torch.int32, device=device),
            -128,
            127,
            axis=0,
        )
    else:
        wqp = tq.QParams(
            torch.full((n, k // 32), 0.02, device=device),
            torch.zeros(n, k // 32, dtype=torch.int32, device=device),
            -8,
            7,
            group_size=32,
        )
    xqp = tq.QParams(0.02, 3, -128, 127) if x_fq else None
    y = tq.fq_linear(x, w, b, weight_qparams=wqp, input_qparams=xqp)
    y.backward(dy)
    return [y.detach(), x.grad, w.grad, b.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wqp_kind,x_fq", [("channel", True), ("group", False)])
def test_fused_linear_is_bitwise_repeatable(device, dtype, wqp_kind, x_fq):
    with tq.use_backend("triton"):
        first = _fwd_bwd(device, dtype, wqp_kind, x_fq)
        for _ in range(2 if torch.device(device).type == "cuda" else 1):
            again = _fwd_bwd(device, dtype, wqp_kind, x_fq)
            for name, a, b in zip(("y", "dx", "dw", "db"), again, first, strict=True):
                assert_bitwise_equal(a, b, name)


def test_training_steps_are_bitwise_repeatable(device):
    """Three optimizer steps of a two-layer QAT model (observers included), twice."""

    def train():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24)
        )
        model = tq.prepare_qat(model, "x86").to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            x = torch.randn(12, 64, generator=g).to(device)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.state_dict()

    with tq.use_backend("triton"):
        a, b = train(), train()
    assert list(a) == list(b)
    for key in a:
        assert_bitwise_equal(a[key], b[key], key)


def test_no_kernel_uses_atomics():
    """Atomic accumulation would make results depend on the order programs finish in; a
    kernel that needs it must be opt-in and documented (none does today)."""
    users = [
        p.name
        for p in KERNELS.glob("*.py")
        if re.search(r"\btl\.atomic_\w+", p.read_text(encoding="utf-8"))
    ]
    assert not users, f"kernels using atomics: {users}"
