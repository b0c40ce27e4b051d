"""What every check shares: result rows, device preparation, comparisons, inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from triton_qat.ops.backend import triton_unavailable_reason

KINDS = (
    "fake_quant",
    "reference_vs_torch",
    "fq_linear",
    "learnable",
    "int_linear",
    "observer",
    "float_formats",
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
QUANT_RANGES = (("int8", -128, 127), ("uint8", 0, 255), ("int4", -8, 7))
# Pass bound of the fused linear's relative error norm against the float64 product.
LINEAR_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclass(frozen=True)
class CheckResult:
    """One row of the check: a comparison of one metric of one case.

    kind: one of KINDS; qconfig: granularity, range and zero-point kind (the weight / input
    quantizers of a linear, the module and observer of an observer case); shape: the input's
    shape, or (M, N, K) for a linear; dtype: "fp32", "fp16" or "bf16"; metric: "y", "dx", "dw",
    "db", "dscale", "dzp", or "min", "max", "scale", "zp" (zero point) for observers; result:
    the human-readable outcome; passed / status ("PASS" or "FAIL").
    tolerance is None where bit-exactness is required (then mismatches counts differing
    elements), else the bound on rel_err.
    max_abs_err and sqnr_db compare the Triton kernels with the eager composition (sqnr_db
    None when they are identical). error holds an exception raised by the case, if any.
    """

    kind: str
    qconfig: str
    shape: tuple[int, ...]
    dtype: str
    metric: str
    result: str
    passed: bool
    tolerance: float | None = None
    mismatches: int | None = None
    max_abs_err: float | None = None
    rel_err: float | None = None
    sqnr_db: float | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def to_json(self) -> dict:
        """A JSON-safe dict: the fields, shape as a list, `status`, non-finite floats as null."""
        row = dataclasses.asdict(self)
        row["shape"] = list(self.shape)
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None
        row["status"] = self.status
        return row


def exit_code(results: Iterable[CheckResult]) -> int:
    """1 when any row failed, else 0."""
    return 0 if all(r.passed for r in results) else 1


# --- device preparation ----------------------------------------------------------------------


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def prepare_device(device: str) -> str | None:
    """Get the Triton kernels ready for tensors on `device`; None when ready, else why not.

    For "cpu" this sets TRITON_INTERPRET=1, which only works before triton is first
    imported. Nothing here queries CUDA unless device is "cuda".
    """
    if device == "cpu":
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        else:
            import triton.language as tl

            if type(tl.cdiv).__name__ != "InterpretedFunction":
                return (
                    "--device cpu needs the Triton interpreter, but triton was already imported "
                    "without TRITON_INTERPRET=1; set it before triton is first imported"
                )
            os.environ["TRITON_INTERPRET"] = "1"
    elif device == "cuda":
        if not torch.cuda.is_available():
            return (
                f"--device cuda: no CUDA device (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda})"
            )
        if _interpret_requested():
            return "--device cuda checks compiled kernels: unset TRITON_INTERPRET"
    else:
        return f"device must be 'cpu' or 'cuda', got {device!r}"
    reason = triton_unavailable_reason(torch.device(device))
    if reason is None and device == "cuda":
        # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
        from triton_qat.kernels import INTERPRETED_KERNELS

        if INTERPRETED_KERNELS:
            reason = "--device cuda checks compiled kernels, but they were loaded interpreted"
    return reason


@contextlib.contextmanager
def _ieee_fp32_matmuls() -> Iterator[None]:
    """TF32 off for torch's matmuls and, through them, for the kernels' fp32 dots."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = old


def _smem_footprint(config) -> int:
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"]


@contextlib.contextmanager
def _one_gemm_config() -> Iterator[None]:
    """Each fused GEMM's autotuner restricted to one config of its list while the check runs:
    every kernel variant compiles once instead of once per config."""
    # Triton is optional (Linux wheels only) and slow to import: kernels load on use.
    from triton_qat.kernels import fq_matmul

    tuners = [
        fq_matmul.fq_linear_fwd_kernel,
        fq_matmul.fq_linear_dx_kernel,
        fq_matmul.fq_linear_dw_kernel,
    ]
    saved = [t.configs for t in tuners]
    try:
        for t in tuners:
            t.configs = [min(t.configs, key=_smem_footprint)]
        yield
    finally:
        for t, configs in zip(tuners, saved, strict=True):
            t.configs = configs


# --- comparisons -----------------------------------------------------------------------------


def _bits(t: Tensor) -> Tensor:
    view_dtype = {4: torch.int32, 2: torch.int16, 1: torch.int8, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view_dtype)


def count_bit_mismatches(actual: Tensor, expected: Tensor) -> int:
    """Elements whose bits differ (signed zeros included); any NaN matches any NaN."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise ValueError(
            f"got {actual.dtype} {tuple(actual.shape)}, expected "
            f"{expected.dtype} {tuple(expected.shape)}"
        )
    a, e = actual.detach(), expected.detach().to(actual.device)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    diff = (a_nan != e_nan) | (~a_nan & ~e_nan & (_bits(a) != _bits(e)))
    return int(diff.sum().item())


def _bit_exact_row(kind, qconfig, shape, dtype, metric, actual, expected) -> CheckResult:
    n = count_bit_mismatches(actual, expected)
    result = "bit-exact" if n == 0 else f"{n} of {actual.numel()} elements differ"
    return CheckResult(kind, qconfig, shape, dtype, metric, result, n == 0, mismatches=n)


def _error_rows(kind, qconfig, shape, dtype, metrics, err: Exception) -> list[CheckResult]:
    msg = f"{type(err).__name__}: {err}".splitlines()[0]
    return [
        CheckResult(kind, qconfig, shape, dtype, m, f"error: {msg}", False, error=msg)
        for m in metrics
    ]


def _norm(t: Tensor) -> float:
    return torch.linalg.vector_norm(t.double()).item()


def _linear_row(qconfig, shape, dtype, metric, tq_out, eager_out, ref64) -> CheckResult:
    tol = LINEAR_TOLERANCE[dtype]
    t = tq_out.detach().double()
    e = eager_out.detach().double()
    err_norm = _norm(t - ref64)
    ref_norm = _norm(ref64)
    rel = err_norm / ref_norm if ref_norm > 0.0 else (0.0 if err_norm == 0.0 else math.inf)
    max_abs = (t - e).abs().max().item() if t.numel() else 0.0
    diff_norm = _norm(t - e)
    sqnr = math.inf if diff_norm == 0.0 else 20.0 * math.log10(max(_norm(e), 1e-300) / diff_norm)
    finite = bool(torch.isfinite(t).all().item())
    passed = finite and rel <= tol
    sign = "<=" if rel <= tol else ">"
    sqnr_text = "inf" if math.isinf(sqnr) else f"{sqnr:.1f}"
    result = (
        f"rel {rel:.2e} {sign} tol {tol:.2e}, max|tq-eager| {max_abs:.2e}, "
        f"SQNR {sqnr_text} dB" + ("" if finite else ", non-finite output")
    )
    return CheckResult(
        "fq_linear",
        qconfig,
        shape,
        DTYPE_NAMES[dtype],
        metric,
        result,
        passed,
        tolerance=tol,
        max_abs_err=max_abs,
        rel_err=rel,
        sqnr_db=None if math.isinf(sqnr) else sqnr,
    )


# --- inputs ----------------------------------------------------------------------------------


def _gen(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _scales(shape: tuple[int, ...], gen: torch.Generator, device: str) -> Tensor:
    """Alternately powers of two (exact ties) and arbitrary values in [0.005, 0.05)."""
    n = math.prod(shape)
    pow2 = 2.0 ** -torch.randint(3, 8, (n,), generator=gen, device=device).float()
    other = 0.005 + 0.045 * torch.rand(n, generator=gen, device=device)
    even = torch.arange(n, device=device) % 2 == 0
    return torch.where(even, pow2, other).reshape(shape)


def _zero_points(
    shape: tuple[int, ...], qmin: int, qmax: int, float_zp: bool, gen: torch.Generator, device
) -> Tensor:
    """Zero points in the middle half of the range: both clamp edges are reachable."""
    lo, hi = (3 * qmin + qmax) // 4, (qmin + 3 * qmax) // 4
    if float_zp:
        return lo + torch.rand(shape, generator=gen, device=device) * (hi - lo)
    return torch.randint(lo, hi + 1, shape, generator=gen, device=device, dtype=torch.int32)


_SPECIALS = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30)


def _fq_input(
    scale_full: Tensor,
    zp_full: Tensor,
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    specials: bool,
) -> Tensor:
    """x with x / scale + zp on ties, next to ties, at the clamp edges, and random.

    scale_full / zp_full: every element's scale and zero point (x's shape, fp32).
    """
    shape, device = scale_full.shape, scale_full.device
    n = scale_full.numel()
    kind = torch.randint(0, 6, (n,), generator=gen, device=device)
    k = torch.randint(qmin - 3, qmax + 3, (n,), generator=gen, device=device).float()
    offsets = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], device=device)
    edge_off = offsets[torch.randint(0, 5, (n,), generator=gen, device=device)]
    low = torch.rand(n, generator=gen, device=device) < 0.5
    edge = torch.where(low, float(qmin), float(qmax)) + edge_off
    spread = float(qmax - qmin + 16)
    rnd = qmin - 8 + torch.rand(n, generator=gen, device=device) * spread
    q = torch.where(kind <= 2, k + 0.5, torch.where(kind == 3, edge, rnd))
    x = ((q - zp_full.reshape(-1).float()) * scale_full.reshape(-1)).to(dtype)
    # Kinds 1 and 2: one ulp (of the dtype) above / below a tie.
    inf = torch.full_like(x, float("inf"))
    x = torch.where(kind == 1, torch.nextafter(x, inf), x)
    x = torch.where(kind == 2, torch.nextafter(x, -inf), x)
    if specials and n >= len(_SPECIALS):
        x[: len(_SPECIALS)] = torch.tensor(_SPECIALS, device=device).to(dtype)
    return x.reshape(shape)
