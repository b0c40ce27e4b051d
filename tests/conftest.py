"""Test configuration.

TRITON_QAT_TEST_DEVICE selects where kernel tests run: "cpu" (default; the Triton
interpreter runs the real kernels on the CPU) or "cuda" (compiled kernels, bench/gpu_check.sh).
TRITON_INTERPRET must be set before triton_qat loads its kernels, hence here, at the top.
"""

import os

TEST_DEVICE = os.environ.get("TRITON_QAT_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # hypothesis is a test extra; the property tests skip without it
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None

if settings is not None:
    # The device fixture is a constant, so reusing it across examples is safe.
    _quiet = [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ]
    # CI: a fixed, reproducible budget. gpu: a longer random run on compiled kernels.
    settings.register_profile(
        "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_quiet
    )
    settings.register_profile("gpu", max_examples=400, deadline=None, suppress_health_check=_quiet)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests run on."""
    return torch.device(TEST_DEVICE)


@pytest.fixture(autouse=True)
def _restore_backend():
    import triton_qat as tq

    before = tq.get_backend()
    yield
    tq.set_backend(before)
