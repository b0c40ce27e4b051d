"""The grid driver and the table `python -m triton_qat check` prints."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

from triton_qat.tools.check import float_formats
from triton_qat.tools.check.common import (
    DTYPE_NAMES,
    KINDS,
    CheckResult,
    _error_rows,
    _ieee_fp32_matmuls,
    _one_gemm_config,
    prepare_device,
)
from triton_qat.tools.check.fake_quant import (
    check_fake_quant,
    check_learnable,
    check_reference_vs_torch,
    fake_quant_cases,
    learnable_cases,
    reference_cases,
)
from triton_qat.tools.check.linear import (
    check_int_linear,
    check_linear,
    int_linear_cases,
    linear_cases,
)
from triton_qat.tools.check.observers import _OBSERVER_METRICS, check_observer, observer_cases

# --- driver ------------------------------------------------------------------------------------


def grid_size(quick: bool, device: str) -> str:
    """ "tiny" with --quick; else "real" on CUDA (fake quant 4096x4096, linear M 1000..8192,
    N, K ~4096) and "medium" on the CPU, where the interpreter would take hours at real
    sizes (fake quant ~256x256, linear 129x65x224)."""
    if quick:
        return "tiny"
    return "real" if device == "cuda" else "medium"


def run_check(
    quick: bool,
    device: str,
    *,
    kinds: Iterable[str] | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run the check grid on `device` ("cpu": kernels interpreted; "cuda": compiled).

    kinds: a subset of KINDS (all by default). on_result is called with each row as soon as
    it is known. A case that raises gives FAIL rows carrying the error. Raises RuntimeError
    when the kernels cannot run on `device` (see prepare_device).
    """
    selected = KINDS if kinds is None else tuple(kinds)
    unknown = set(selected) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown check kinds {sorted(unknown)}; known: {KINDS}")
    reason = prepare_device(device)
    if reason is not None:
        raise RuntimeError(reason)
    size = grid_size(quick, device)

    jobs: list[tuple[str, object, Callable[[], list[CheckResult]], tuple[str, ...]]] = []
    if "fake_quant" in selected:
        for c in fake_quant_cases(size):
            jobs.append(("fake_quant", c, lambda c=c: check_fake_quant(c, device), ("y", "dx")))
    if "reference_vs_torch" in selected:
        for c in reference_cases(size):
            jobs.append(
                ("reference_vs_torch", c, lambda c=c: check_reference_vs_torch(c), ("y", "dx"))
            )
    if "fq_linear" in selected:
        for c in linear_cases(size):
            jobs.append(
                ("fq_linear", c, lambda c=c: check_linear(c, device), ("y", "dx", "dw", "db"))
            )

    if "int_linear" in selected:
        for c in int_linear_cases(size):
            jobs.append(("int_linear", c, lambda c=c: check_int_linear(c, device), ("y",)))

    if "learnable" in selected:
        for c in learnable_cases(size):
            metrics = ("y", "dx", "dscale", "dzp")
            jobs.append(("learnable", c, lambda c=c: check_learnable(c, device), metrics))

    if "observer" in selected:
        for c in observer_cases(size):
            jobs.append(("observer", c, lambda c=c: check_observer(c, device), _OBSERVER_METRICS))

    if "float_formats" in selected:
        for c in float_formats.fake_quant_cases(size):
            jobs.append(
                ("float_formats", c, lambda c=c: float_formats.check_fake_quant(c, device), ("y",))
            )
        for c in float_formats.linear_cases(size):
            job = lambda c=c: float_formats.check_linear(c, device)
            jobs.append(("float_formats", c, job, ("y", "dx", "dw", "db")))

    results: list[CheckResult] = []
    gemm_pin = _one_gemm_config() if device == "cuda" else contextlib.nullcontext()
    with _ieee_fp32_matmuls(), gemm_pin:
        for kind, case, job, metrics in jobs:
            try:
                rows = job()
            except Exception as err:  # a crash is a failed case, reported like any other
                shape = case.shape  # type: ignore[attr-defined]
                dtype = DTYPE_NAMES[case.dtype]  # type: ignore[attr-defined]
                rows = _error_rows(kind, case.label, shape, dtype, metrics, err)  # type: ignore[attr-defined]
            for row in rows:
                results.append(row)
                if on_result is not None:
                    on_result(row)
    return results


# --- table -------------------------------------------------------------------------------------

_COLUMNS = (
    ("kind", 18),
    ("qconfig", 40),
    ("shape", 16),
    ("dtype", 5),
    ("metric", 6),
    ("result", 72),
)


def table_header() -> str:
    """The header line of the printed table."""
    return "  ".join([*(name.ljust(width) for name, width in _COLUMNS), "status"])


def format_row(row: CheckResult) -> str:
    """One table line: kind, qconfig, shape, dtype, metric, result, PASS/FAIL."""
    shape = "x".join(str(s) for s in row.shape)
    values = (row.kind, row.qconfig, shape, row.dtype, row.metric, row.result)
    cells = [v.ljust(width) for v, (_, width) in zip(values, _COLUMNS, strict=True)]
    return "  ".join([*cells, row.status])


def format_table(results: Iterable[CheckResult]) -> str:
    """The whole table, header first."""
    return "\n".join([table_header(), *(format_row(r) for r in results)])
