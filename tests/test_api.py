"""Public names, backend selection and argument validation (API.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import triton_qat as tq


def _run_python(code: str, env_update: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k, v in env_update.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_public_names():
    for name in (
        "set_backend",
        "get_backend",
        "use_backend",
        "QParams",
        "fake_quantize_per_tensor",
        "fake_quantize_per_channel",
        "fake_quantize_per_group",
    ):
        assert hasattr(tq, name), name


def test_backend_switching():
    tq.set_backend("eager")
    assert tq.get_backend() == "eager"
    with tq.use_backend("triton"):
        assert tq.get_backend() == "triton"
        with tq.use_backend("auto"):
            assert tq.get_backend() == "auto"
        assert tq.get_backend() == "triton"
    assert tq.get_backend() == "eager"


def test_use_backend_restores_after_error():
    tq.set_backend("auto")
    with pytest.raises(KeyError), tq.use_backend("eager"):
        raise KeyError("boom")
    assert tq.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["cuda", "", None, 3])
def test_bad_backend_name(bad):
    with pytest.raises(ValueError, match="backend"):
        tq.set_backend(bad)
    with pytest.raises(ValueError, match="backend"), tq.use_backend(bad):
        pass


def test_import_touches_no_cuda_and_env_sets_backend():
    code = (
        "import torch\n"
        "def boom(*a, **k): raise SystemExit('CUDA touched at import')\n"
        "torch.cuda.init = boom; torch.cuda._lazy_init = boom\n"
        "torch.cuda.is_available = boom; torch.cuda.device_count = boom\n"
        "import triton_qat as tq\n"
        "print(tq.get_backend())\n"
    )
    r = _run_python(code, {"TRITON_QAT_BACKEND": "eager", "TRITON_INTERPRET": None})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "eager"


def test_bad_env_backend_warns_and_imports():
    code = "import triton_qat as tq; print(tq.get_backend())"
    r = _run_python(code, {"TRITON_QAT_BACKEND": "fast"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "auto"
    assert "TRITON_QAT_BACKEND" in r.stderr
    r = _run_python(code, {"TRITON_QAT_BACKEND": " Eager "})
    assert r.stdout.strip() == "eager"


def test_cpu_without_interpreter():
    """auto falls back to eager on CPU tensors; triton raises and names the reason."""
    code = (
        "import torch, triton_qat as tq\n"
        "x = torch.randn(8)\n"
        "ref = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127)\n"
        "assert torch.equal(tq.fake_quantize_per_tensor(x, 0.1, 0, -128, 127), ref)\n"
        "tq.set_backend('triton')\n"
        "try:\n"
        "    tq.fake_quantize_per_tensor(x, 0.1, 0, -128, 127)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    r = _run_python(code, {"TRITON_INTERPRET": None, "TRITON_QAT_BACKEND": None})
    assert r.returncode == 0, r.stderr
    assert "TRITON_INTERPRET" in r.stdout and "'triton'" in r.stdout


def test_auto_uses_kernels_under_interpreter(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs where the test device is the interpreted CPU")
    import triton_qat.kernels.fake_quant as fq

    calls = []
    real = fq.fake_quant_forward
    monkeypatch.setattr(fq, "fake_quant_forward", lambda *a: calls.append(1) or real(*a))
    tq.set_backend("auto")
    tq.fake_quantize_per_tensor(torch.randn(4), 0.1, 0, -128, 127)
    assert calls == [1]
    tq.set_backend("eager")
    tq.fake_quantize_per_tensor(torch.randn(4), 0.1, 0, -128, 127)
    assert calls == [1]


# --- argument validation: ValueError / TypeError naming the argument ----------------------

X = torch.randn(4, 8)
S4 = torch.full((4,), 0.1)
Z4 = torch.zeros(4, dtype=torch.int32)


@pytest.mark.parametrize(
    "call,exc,word",
    [
        (lambda: tq.fake_quantize_per_tensor(X, 0.1, 0, 5, 3), ValueError, "quant_min"),
        (lambda: tq.fake_quantize_per_tensor(X, 0.1, 0, 0.0, 255), TypeError, "quant_min"),
        (lambda: tq.fake_quantize_per_tensor(X, 0.1, 0, -128, True), TypeError, "quant_max"),
        (lambda: tq.fake_quantize_per_tensor(X, 0.1, 0, 0, 2**20 + 1), ValueError, "quant_max"),
        (lambda: tq.fake_quantize_per_tensor(X, 0.1, 0, -(2**31), 0), ValueError, "quant_min"),
        (lambda: tq.fake_quantize_per_tensor(X, 0.1, 300, -128, 127), ValueError, "zero_point"),
        (lambda: tq.fake_quantize_per_tensor(X, 0.1, 0.5, -128, 127), TypeError, "zero_point"),
        (
            lambda: tq.fake_quantize_per_tensor(X, 0.1, torch.tensor([0.5]), -128, 127),
            TypeError,
            "zero_point",
        ),
        (lambda: tq.fake_quantize_per_tensor(X, "0.1", 0, -128, 127), TypeError, "scale"),
        (
            lambda: tq.fake_quantize_per_tensor(
                X, torch.tensor([0.1], dtype=torch.float64), 0, -128, 127
            ),
            TypeError,
            "scale",
        ),
        (lambda: tq.fake_quantize_per_tensor(X, S4, 0, -128, 127), ValueError, "scale"),
        (lambda: tq.fake_quantize_per_tensor(X.double(), 0.1, 0, -128, 127), TypeError, "x"),
        (lambda: tq.fake_quantize_per_tensor(X.long(), 0.1, 0, -128, 127), TypeError, "x"),
        (lambda: tq.fake_quantize_per_tensor([1.0], 0.1, 0, -128, 127), TypeError, "x"),
        (lambda: tq.fake_quantize_per_channel(X, S4[:3], Z4, 0, -128, 127), ValueError, "scale"),
        (
            lambda: tq.fake_quantize_per_channel(X, S4, Z4[:3], 0, -128, 127),
            ValueError,
            "zero_point",
        ),
        (lambda: tq.fake_quantize_per_channel(X, S4, Z4, 1, -128, 127), ValueError, "scale"),
        (lambda: tq.fake_quantize_per_channel(X, S4, Z4, 2, -128, 127), ValueError, "axis"),
        (lambda: tq.fake_quantize_per_channel(X, S4, Z4, 0.0, -128, 127), TypeError, "axis"),
        (
            lambda: tq.fake_quantize_per_channel(X, S4, Z4 + 200, 0, -128, 127),
            ValueError,
            "zero_point",
        ),
        (
            lambda: tq.fake_quantize_per_channel(X, S4, Z4.to(torch.int16), 0, -128, 127),
            TypeError,
            "zero_point",
        ),
        (
            lambda: tq.fake_quantize_per_channel(X, S4.view(2, 2), Z4, 0, -128, 127),
            ValueError,
            "scale",
        ),
        (lambda: tq.fake_quantize_per_channel(X, 0.1, Z4, 0, -128, 127), ValueError, "scale"),
        (lambda: tq.fake_quantize_per_group(X, S4, Z4, 3, -128, 127), ValueError, "group_size"),
        (lambda: tq.fake_quantize_per_group(X, S4, Z4, 0, -128, 127), ValueError, "group_size"),
        (lambda: tq.fake_quantize_per_group(X, S4, Z4, 4, -128, 127), ValueError, "scale"),
        (
            lambda: tq.fake_quantize_per_group(X, S4.view(4, 1).repeat(1, 2), Z4, 4, -128, 127),
            ValueError,
            "zero_point",
        ),
        (lambda: tq.fake_quantize_per_group(X, 0.1, 0, 4, -128, 127), TypeError, "scale"),
    ],
)
def test_bad_arguments_name_the_argument(call, exc, word):
    for backend in ("eager", "auto"):
        with tq.use_backend(backend), pytest.raises(exc, match=word):
            call()


def test_qparams_granularity_and_checks():
    assert tq.QParams(0.1, 0, -128, 127).granularity == "per_tensor"
    assert tq.QParams(S4, Z4, -128, 127, axis=0).granularity == "per_channel"
    assert tq.QParams(S4, Z4, -128, 127, group_size=2).granularity == "per_group"
    with pytest.raises(ValueError, match="axis"):
        tq.QParams(S4, Z4, -128, 127, axis=0, group_size=2)
    with pytest.raises(ValueError, match="quant_min"):
        tq.QParams(0.1, 0, 1, 0)


def test_device_mismatch_names_the_argument():
    if not torch.cuda.is_available():
        meta = torch.empty(4, 8, device="meta")
        with pytest.raises(ValueError, match="scale"):
            tq.fake_quantize_per_channel(meta, S4, Z4, 0, -128, 127)
        return
    xc = X.cuda()
    with pytest.raises(ValueError, match="scale"):
        tq.fake_quantize_per_channel(xc, S4, Z4.cuda(), 0, -128, 127)
    with pytest.raises(ValueError, match="zero_point"):
        tq.fake_quantize_per_channel(xc, S4.cuda(), Z4, 0, -128, 127)


def test_float_zero_point_outside_the_range_is_accepted_as_torch():
    # torch checks integer zero points only; float ones (-min / scale of torch.ao's
    # per_channel_affine_float_qparams) may lie outside [quant_min, quant_max].
    zp = torch.full((4,), 300.0)
    expected = torch.fake_quantize_per_channel_affine(X, S4, zp, 0, -128, 127)
    assert torch.equal(tq.fake_quantize_per_channel(X, S4, zp, 0, -128, 127), expected)


def test_zero_point_range_checked_before_narrowing():
    x = torch.tensor([-1.0, 1.0])
    with pytest.raises(ValueError, match="zero_point"):
        tq.fake_quantize_per_tensor(x, 0.1, torch.tensor([2**32 + 5]), 0, 255)
    with pytest.raises(ValueError, match="zero_point"):
        tq.fake_quantize_per_tensor(x, 0.1, 2**40, 0, 255)
    with pytest.raises(ValueError, match="zero_point"):
        tq.fake_quantize_per_channel(
            X, S4, torch.tensor([0, 0, 0, -(2**32)], dtype=torch.int64), 0, -128, 127
        )


def test_per_channel_zero_point_must_be_1d():
    with pytest.raises(ValueError, match="zero_point"):
        tq.fake_quantize_per_channel(X, S4, Z4.view(1, 4), 0, -128, 127)


def test_numpy_scalars_and_huge_scale():
    np = pytest.importorskip("numpy")
    y32 = tq.fake_quantize_per_tensor(X, np.float32(0.1), np.int32(0), -128, 127)
    y = tq.fake_quantize_per_tensor(X, 0.1, 0, -128, 127)
    assert torch.equal(y32, y)
    with pytest.raises(ValueError, match="scale"):
        tq.fake_quantize_per_tensor(X, 10**400, 0, -128, 127)


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_qparams_get_no_gradient(backend):
    """Non-learnable qparams: a scale that requires grad is used as a constant on every path."""
    scale = torch.full((4,), 0.1, requires_grad=True)
    with tq.use_backend(backend):
        y = tq.fake_quantize_per_channel(X, scale, Z4, 0, -128, 127)
    assert y.grad_fn is None


def test_interpreter_switched_after_triton_import_is_refused():
    code = (
        "import os, torch\n"
        "import triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import triton_qat as tq\n"
        "x = torch.randn(4)\n"
        "assert torch.equal(tq.fake_quantize_per_tensor(x, 0.1, 0, -128, 127),\n"
        "                   torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -128, 127))\n"
        "tq.set_backend('triton')\n"
        "try:\n"
        "    tq.fake_quantize_per_tensor(x, 0.1, 0, -128, 127)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    r = _run_python(code, {"TRITON_INTERPRET": None, "TRITON_QAT_BACKEND": None})
    assert r.returncode == 0, r.stderr
    assert "before triton is first imported" in r.stdout
