"""Test configuration.

TRITON_QAT_TEST_DEVICE selects where kernel tests run: "cpu" (default; the Triton
interpreter runs the real kernels on the CPU) or "cuda" (compiled kernels, bench/gpu_check.sh).
TRITON_INTERPRET must be set before triton_qat loads its kernels, hence here, at the top.
"""

import os

TEST_DEVICE = os.environ.get("TRITON_QAT_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One GEMM config: tests check numerics, and tuning every odd test shape takes hours.
    os.environ.setdefault("TRITON_QAT_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs `-n auto`) the workers share the cores: each takes its
# share of torch's threads rather than every worker one thread per core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (_cores or 1) // _WORKERS))

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


def pytest_collection_modifyitems(config, items):
    """torch's float-zero-point CPU kernel computes zp + x * inv in one FMA in its vectorized
    builds (AVX2, AVX-512), as its CUDA kernel does, and rounds twice in the DEFAULT build.
    triton_qat follows the former; torch parity for float zero points is only asserted there.
    """
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return
    skip = pytest.mark.skip(
        reason="torch's DEFAULT CPU build rounds x * inv before adding a "
        "float zero point; triton_qat fuses them, as torch's vectorized "
        "and CUDA kernels do"
    )
    for item in items:
        if "test_reference.py" in item.nodeid and (
            "float_zp" in item.nodeid or item.get_closest_marker("float_zp_vs_torch")
        ):
            item.add_marker(skip)
