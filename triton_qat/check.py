"""`python -m triton_qat check`: every kernel against the eager reference, and the reference
against torch, over a grid of qconfigs x shapes x dtypes.

Four kinds of rows (`CheckResult`), one per (case, metric):

- ``fake_quant``: the Triton fake-quant kernels (backend "triton") against the eager
  reference (backend "eager"), forward ``y`` and input gradient ``dx``, bit for bit (NaN
  matches NaN). Per tensor, per channel (axis 0 and the last axis), per group (32, 128 and an
  odd divisor); fp32 / fp16 / bf16; int8 / uint8 / int4 ranges; integer and float zero
  points. Inputs mix exact ties (x / scale = k + 0.5), their neighbours one ulp away, values
  at and beyond both clamp edges, random values, and NaN / +-inf / +-0 / 1e30.
- ``reference_vs_torch``: triton_qat.reference against torch.fake_quantize_per_tensor_affine
  / per_channel_affine on the CPU (per group against the per-channel op on the (-1, group)
  view), integer zero points, finite moderate inputs, forward and gradient, bit for bit.
- ``observer``: the observe kernels (backend "triton") against the eager observer code
  (backend "eager"): FakeQuantize with a (moving-average) min/max observer per tensor, per
  channel along the first and the last axis and per group, and FusedMovingAvgObsFakeQuantize
  per tensor and per channel; symmetric and affine, int8 / uint8 / int4 ranges, three
  observation steps (one with NaN and +-inf for the unfused modules), running ``min`` / ``max``,
  ``scale`` and zero point (``zp``) bit for bit.
- ``fq_linear``: tq.fq_linear on the Triton kernels against the eager composition, outputs
  ``y`` and gradients ``dx``, ``dw``, ``db``. The pass criterion is the relative error norm
  ``||tq - ref64|| / ||ref64||`` against a float64 product of the same fake-quantized
  operands: at most the dtype's unit roundoff (2**-8 bf16, 2**-11 fp16; products of two
  half-precision values are exact in fp32, so the kernel differs from ref64 by its fp32
  accumulation, ~K * 2**-24, and one rounding to the dtype, <= u per element), and 1e-5 for
  fp32 (TF32 off for the whole check). The row also reports the max abs difference and the
  SQNR of the kernels against the eager composition. Inputs are fake-quantized per tensor,
  not at all, or dynamically per token (the w8a8_dynamic / w4a8_dynamic recipes, each row's
  qparams from the Triton per-row pass; ref64 takes them from the eager formula).

- ``learnable``: the learnable (LSQ) ops on the Triton kernels against the eager reference,
  per tensor and per channel (axis 0 and the last axis), fp32 / bf16, float zero points on
  and off halves: ``y`` and ``dx`` bit for bit; ``dscale`` and ``dzp`` (sums of per-element
  terms that the kernels add up in another order) pass when, per channel,
  ``|got - exact| / sum|terms|`` is at most ``(n - 1) * 2**-24``, the error bound of any
  fp32 summation order of n terms, against the float64 sum of the reference's terms.

Sizes (`grid_size`): --quick uses tiny odd shapes (seconds under the interpreter); the full
grid uses real sizes on CUDA (fake quant 4096x4096, linear M = 1000..8192 with N, K ~ 4096)
and medium ones on the CPU, where the interpreter would take hours at real sizes.

On CUDA every fused GEMM runs one config of its autotune list (the one with the smallest
shared-memory footprint) so that the grid compiles each kernel variant once, not once per
config; `python -m triton_qat autotune` exercises the autotuner. Under the interpreter the
list has one config anyway.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

import triton_qat as tq
from triton_qat import ops, reference
from triton_qat.qparams import PerTokenQParams, QParams, normalize

KINDS = ("fake_quant", "reference_vs_torch", "fq_linear", "learnable", "int_linear", "observer")
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
    from triton_qat._backend import triton_unavailable_reason

    reason = triton_unavailable_reason(torch.device(device))
    if reason is None and device == "cuda":
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


# --- fake quant cases --------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeQuantCase:
    """One fake-quant comparison: granularity, input shape, dtype, range and zero-point kind."""

    granularity: str  # "per_tensor", "per_channel" or "per_group"
    shape: tuple[int, ...]
    dtype: torch.dtype
    qrange: tuple[str, int, int]  # (name, quant_min, quant_max)
    float_zp: bool = False
    axis: int | None = None
    group_size: int | None = None

    @property
    def label(self) -> str:
        if self.granularity == "per_channel":
            gran = f"per_channel(axis={self.axis})"
        elif self.granularity == "per_group":
            gran = f"per_group({self.group_size})"
        else:
            gran = "per_tensor"
        return f"{gran} {self.qrange[0]} zp={'float' if self.float_zp else 'int'}"


def _granularities(size: str) -> list[tuple[str, tuple[int, ...], int | None, int | None]]:
    """(granularity, shape, axis, group_size); tiny and medium extents are odd where the
    group size allows (no multiple of a block)."""
    if size == "tiny":
        return [
            ("per_tensor", (37, 67), None, None),
            ("per_channel", (5, 7, 33), 0, None),
            ("per_channel", (5, 7, 33), -1, None),
            ("per_group", (9, 96), None, 32),
            ("per_group", (5, 256), None, 128),
            ("per_group", (7, 189), None, 63),
        ]
    if size == "medium":
        return [
            ("per_tensor", (255, 257), None, None),
            ("per_channel", (9, 31, 129), 0, None),
            ("per_channel", (9, 31, 129), -1, None),
            ("per_group", (129, 256), None, 32),
            ("per_group", (65, 384), None, 128),
            ("per_group", (127, 252), None, 63),
        ]
    big = (4096, 4096)
    return [
        ("per_tensor", big, None, None),
        ("per_channel", big, 0, None),
        ("per_channel", big, -1, None),
        ("per_group", big, None, 32),
        ("per_group", big, None, 128),
        ("per_group", (4096, 4095), None, 63),
    ]


def fake_quant_cases(size: str) -> list[FakeQuantCase]:
    """The fake-quant grid: granularities x dtypes x ranges x zero-point kinds."""
    cases = []
    for gran, shape, axis, group in _granularities(size):
        for dtype in DTYPES:
            for qrange in QUANT_RANGES:
                # A float zero point exists per channel and per group only (as in torch).
                for float_zp in (False,) if gran == "per_tensor" else (False, True):
                    cases.append(FakeQuantCase(gran, shape, dtype, qrange, float_zp, axis, group))
    return cases


def _case_qparams(case: FakeQuantCase, device: str, gen: torch.Generator):
    """(QParams, per-element scale, per-element zero point) of a fake-quant case."""
    _, qmin, qmax = case.qrange
    shape = case.shape
    if case.granularity == "per_tensor":
        scale, zp = 2.0**-5, (3 * qmin + 5 * qmax) // 8
        qp = QParams(scale, zp, qmin, qmax)
        full_scale = torch.full(shape, scale, device=device)
        return qp, full_scale, torch.full(shape, float(zp), device=device)
    if case.granularity == "per_channel":
        axis = case.axis % len(shape)
        pshape = (shape[axis],)
        view = [1] * len(shape)
        view[axis] = -1
    else:
        axis = None
        pshape = (*shape[:-1], shape[-1] // case.group_size)
    scale = _scales(pshape, gen, device)
    zp = _zero_points(pshape, qmin, qmax, case.float_zp, gen, device)
    if axis is not None:
        qp = QParams(scale, zp, qmin, qmax, axis=case.axis)
        return qp, scale.reshape(view).expand(shape), zp.float().reshape(view).expand(shape)
    qp = QParams(scale, zp, qmin, qmax, group_size=case.group_size)
    g = case.group_size
    return qp, scale.repeat_interleave(g, dim=-1), zp.float().repeat_interleave(g, dim=-1)


def _public_op(qp: QParams) -> Callable[[Tensor], Tensor]:
    if qp.granularity == "per_tensor":
        return lambda t: tq.fake_quantize_per_tensor(
            t, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max
        )
    if qp.granularity == "per_channel":
        return lambda t: tq.fake_quantize_per_channel(
            t, qp.scale, qp.zero_point, qp.axis, qp.quant_min, qp.quant_max
        )
    return lambda t: tq.fake_quantize_per_group(
        t, qp.scale, qp.zero_point, qp.group_size, qp.quant_min, qp.quant_max
    )


def _forward_backward(fn, x: Tensor, dy: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    xi = x.detach().clone().requires_grad_()
    with tq.use_backend(backend):
        y = fn(xi)
        y.backward(dy)
    return y.detach(), xi.grad


def _grad_output(shape, dtype, gen, device) -> Tensor:
    dy = torch.randn(shape, generator=gen, device=device).to(dtype)
    if dy.numel() > 1:
        dy.view(-1)[1] = float("nan")  # NaN * 0 stays NaN where clamped, as in torch
    return dy


def check_fake_quant(case: FakeQuantCase, device: str, seed: int = 0) -> list[CheckResult]:
    """Kernel ("triton") vs reference ("eager"): forward y and input gradient dx, bit for bit."""
    gen = _gen(device, seed)
    qp, scale_full, zp_full = _case_qparams(case, device, gen)
    _, qmin, qmax = case.qrange
    x = _fq_input(scale_full, zp_full, qmin, qmax, case.dtype, gen, specials=True)
    dy = _grad_output(case.shape, case.dtype, gen, device)
    fn = _public_op(qp)
    y_t, dx_t = _forward_backward(fn, x, dy, "triton")
    y_e, dx_e = _forward_backward(fn, x, dy, "eager")
    args = ("fake_quant", case.label, case.shape, DTYPE_NAMES[case.dtype])
    return [_bit_exact_row(*args, "y", y_t, y_e), _bit_exact_row(*args, "dx", dx_t, dx_e)]


# --- reference vs torch ----------------------------------------------------------------------


def reference_cases(size: str) -> list[FakeQuantCase]:
    """Reference vs torch's CPU ops: integer zero points, per tensor / channel / group."""
    shape = (37, 96) if size == "tiny" else (512, 1024)
    grans = [
        ("per_tensor", None, None),
        ("per_channel", 0, None),
        ("per_channel", -1, None),
        ("per_group", None, 32),
    ]
    return [
        FakeQuantCase(gran, shape, dtype, qrange, False, axis, group)
        for gran, axis, group in grans
        for dtype in DTYPES
        for qrange in QUANT_RANGES
    ]


def _torch_fake_quant(x: Tensor, qp: QParams) -> Tensor:
    if qp.granularity == "per_tensor":
        return torch.fake_quantize_per_tensor_affine(
            x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max
        )
    if qp.granularity == "per_channel":
        return torch.fake_quantize_per_channel_affine(
            x, qp.scale, qp.zero_point, qp.axis % x.dim(), qp.quant_min, qp.quant_max
        )
    # Per group = per channel over the (-1, group) view, one parameter per row.
    g = qp.group_size
    y = torch.fake_quantize_per_channel_affine(
        x.reshape(-1, g),
        qp.scale.reshape(-1),
        qp.zero_point.reshape(-1),
        0,
        qp.quant_min,
        qp.quant_max,
    )
    return y.reshape(x.shape)


def check_reference_vs_torch(case: FakeQuantCase, seed: int = 0) -> list[CheckResult]:
    """triton_qat.reference vs torch's fake-quant ops on the CPU, forward and gradient."""
    gen = _gen("cpu", seed)
    qp, scale_full, zp_full = _case_qparams(case, "cpu", gen)
    _, qmin, qmax = case.qrange
    x = _fq_input(scale_full, zp_full, qmin, qmax, case.dtype, gen, specials=False)
    dy = torch.randn(case.shape, generator=gen).to(case.dtype)
    nq = normalize(x, qp)
    y_ref = reference.fake_quantize_ref(x, nq)
    dx_ref = reference.fake_quantize_backward_ref(x, dy, nq)
    xi = x.clone().requires_grad_()
    y_torch = _torch_fake_quant(xi, qp)
    y_torch.backward(dy)
    args = ("reference_vs_torch", case.label, case.shape, DTYPE_NAMES[case.dtype])
    return [
        _bit_exact_row(*args, "y", y_ref, y_torch.detach()),
        _bit_exact_row(*args, "dx", dx_ref, xi.grad),
    ]


# --- learnable qparams (LSQ) -------------------------------------------------------------------

FP32_UNIT_ROUNDOFF = 2.0**-24
# The learnable ops' grad_factor in the check: not a power of two, so its rounding shows.
_LEARNABLE_GRAD_FACTOR = 0.3


def learnable_cases(size: str) -> list[FakeQuantCase]:
    """Per tensor and per channel (axis 0, last axis) x fp32 / bf16 x int8 (and uint8 beyond
    the quick grid)."""
    cases = []
    for gran, shape, axis, _ in _granularities(size)[:3]:
        for dtype in (torch.float32, torch.bfloat16):
            for qrange in QUANT_RANGES[: 1 if size == "tiny" else 2]:
                cases.append(FakeQuantCase(gran, shape, dtype, qrange, True, axis))
    return cases


def _learnable_qparams(case: FakeQuantCase, device: str, gen: torch.Generator):
    """(scale, float zero point) of shape (1,) or (channels,); every other zero point on a
    half, where the forward's and the per-tensor backward's roundings differ."""
    _, qmin, qmax = case.qrange
    n = 1 if case.axis is None else case.shape[case.axis]
    scale = _scales((n,), gen, device)
    zp = _zero_points((n,), qmin, qmax, True, gen, device)
    even = torch.arange(n, device=device) % 2 == 0
    return scale, torch.where(even, zp.floor() + 0.5, zp)


def learnable_grads(x, dy, scale, zero_point, axis, qmin, qmax, grad_factor, backend):
    """(y, dx, dscale, dzp) of the learnable op (per tensor when axis is None) on `backend`."""
    xi, si, zi = (t.detach().clone().requires_grad_() for t in (x, scale, zero_point))
    with tq.use_backend(backend):
        if axis is None:
            y = ops.fake_quantize_learnable(xi, si, zi, qmin, qmax, grad_factor)
        else:
            y = ops.fake_quantize_learnable_per_channel(xi, si, zi, axis, qmin, qmax, grad_factor)
        y.backward(dy)
    return y.detach(), xi.grad, si.grad, zi.grad


def summation_error(got: Tensor, terms: Tensor, dims: list[int]) -> tuple[float, float]:
    """(max over channels of |got - exact| / sum|terms|, (n - 1) * 2**-24): got, an fp32 sum of
    the fp32 `terms` over `dims` in any order, is within the second of the exact (float64)
    sum (Higham, Accuracy and Stability of Numerical Algorithms, eq. 4.4)."""
    n = math.prod(terms.shape[d] for d in dims)
    exact = terms.double().sum(dims).reshape(-1)
    magnitude = terms.double().abs().sum(dims).reshape(-1)
    err = (got.detach().double().cpu().reshape(-1) - exact.cpu()).abs()
    rel = torch.where(magnitude > 0, err / magnitude, err)  # no terms: any error is one
    return float(rel.max()) if rel.numel() else 0.0, (n - 1) * FP32_UNIT_ROUNDOFF


def check_learnable(case: FakeQuantCase, device: str, seed: int = 0) -> list[CheckResult]:
    """Learnable kernels vs reference: y and dx bit for bit, dscale and dzp within the
    summation-order bound of the exact sum of the reference's per-element terms."""
    gen = _gen(device, seed)
    _, qmin, qmax = case.qrange
    scale, zp = _learnable_qparams(case, device, gen)
    view = [1] * len(case.shape)
    if case.axis is not None:
        view[case.axis] = -1
    zp_fwd = reference.learnable_zero_point(zp, qmin, qmax, trunc=False)
    full = [t.reshape(view).expand(case.shape) for t in (scale, zp_fwd)]
    x = _fq_input(*full, qmin, qmax, case.dtype, gen, specials=False)
    dy = torch.randn(case.shape, generator=gen, device=device).to(case.dtype)
    gf = _LEARNABLE_GRAD_FACTOR
    got = learnable_grads(x, dy, scale, zp, case.axis, qmin, qmax, gf, "triton")
    want = learnable_grads(x, dy, scale, zp, case.axis, qmin, qmax, gf, "eager")
    args = ("learnable", case.label, case.shape, DTYPE_NAMES[case.dtype])
    rows = [
        _bit_exact_row(*args, "y", got[0], want[0]),
        _bit_exact_row(*args, "dx", got[1], want[1]),
    ]
    nq = ops.learnable_backward_norm(x, scale, zp, qmin, qmax, case.axis)
    _, ds_terms, dz_terms = reference.learnable_grad_terms_ref(x, dy, nq, gf)
    dims = reference.learnable_reduce_dims(x.shape, case.axis)
    for metric, grad, terms in (("dscale", got[2], ds_terms), ("dzp", got[3], dz_terms)):
        rel, bound = summation_error(grad, terms, dims)
        passed = rel <= bound
        result = f"rel err {rel:.2e} {'<=' if passed else '>'} bound {bound:.2e}"
        rows.append(CheckResult(*args, metric, result, passed, tolerance=bound, rel_err=rel))
    return rows


# --- fused linear ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearCase:
    """One fused-linear comparison: x (M, K), weight (N, K), bias (N,), all in `dtype`."""

    m: int
    n: int
    k: int
    w_granularity: str  # "per_tensor", "per_channel" or "per_group" (32)
    input_fq: bool
    dtype: torch.dtype
    # Dynamic per-token input instead: symmetric with int8 per-channel weights (w8a8_dynamic),
    # affine with int4 per-group ones (w4a8_dynamic).
    input_per_token: bool = False

    @property
    def label(self) -> str:
        w = {
            "per_tensor": "w int8 per_tensor",
            "per_channel": "w int8 per_channel",
            "per_group": "w int4 per_group(32)",
        }[self.w_granularity]
        if self.input_per_token:
            scheme = "sym" if self.w_granularity == "per_channel" else "asym"
            return f"{w} + x per_token({scheme})"  # int8, as the per-tensor input
        return w + (" + x int8 per_tensor" if self.input_fq else "")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.m, self.n, self.k)


BOOLS = (False, True)


def linear_cases(size: str) -> list[LinearCase]:
    """Weight granularities x input fake quant (none, per tensor; per token with per-channel
    and per-group weights) x dtypes, over one or more (M, N, K)."""
    if size == "tiny":
        shapes = {dtype: [(33, 17, 96)] for dtype in DTYPES}
    elif size == "medium":
        shapes = {dtype: [(129, 65, 224)] for dtype in DTYPES}
    else:
        shapes = {
            torch.bfloat16: [(1024, 4096, 4096), (8192, 4096, 4096), (1000, 4000, 4064)],
            torch.float16: [(1024, 4096, 4096)],
            torch.float32: [(1024, 4096, 4096)],
        }
    return [
        LinearCase(m, n, k, gran, input_fq, dtype, per_token)
        for dtype in (torch.bfloat16, torch.float16, torch.float32)
        for m, n, k in shapes[dtype]
        for gran, input_fq, per_token in (
            *((g, fq, False) for g in ("per_tensor", "per_channel", "per_group") for fq in BOOLS),
            ("per_channel", False, True),
            ("per_group", False, True),
        )
    ]


def _linear_qparams(case: LinearCase, device: str, gen: torch.Generator):
    n, k = case.n, case.k
    if case.w_granularity == "per_tensor":
        wqp = QParams(5.0 / 255, 3, -128, 127)
    elif case.w_granularity == "per_channel":
        scale = (5.0 / 255) * (0.5 + torch.rand(n, generator=gen, device=device))
        zp = _zero_points((n,), -128, 127, False, gen, device)
        wqp = QParams(scale, zp, -128, 127, axis=0)
    else:
        pshape = (n, k // 32)
        scale = (5.0 / 15) * (0.5 + torch.rand(pshape, generator=gen, device=device))
        zp = _zero_points(pshape, 0, 15, False, gen, device)
        wqp = QParams(scale, zp, 0, 15, group_size=32)
    # About [-4.0, 3.7]: clamps a few values of 1.5 * randn.
    xqp = QParams(0.03, 5, -128, 127) if case.input_fq else None
    if case.input_per_token:
        xqp = PerTokenQParams(-128, 127, symmetric=case.w_granularity == "per_channel")
    return wqp, xqp


def _linear_run(x, w, b, dy, wqp, xqp, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with tq.use_backend(backend):
        y = tq.fq_linear(xi, wi, bi, weight_qparams=wqp, input_qparams=xqp)
        y.backward(dy)
    return y.detach(), xi.grad, wi.grad, bi.grad


def _linear_reference64(x, w, b, dy, wqp, xqp) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y, dx, dw, db in float64 from the same rounded operands the kernels multiply
    (per-token input qparams from the eager formula)."""
    with torch.no_grad(), tq.use_backend("eager"):
        lq = ops.linear_quant(x, w, wqp, xqp)
        xq, mask_x, wq, mask_w = reference.fq_linear_operands(x, w, lq)
        x64, w64, dy64 = xq.double(), wq.double(), dy.double()
        y = torch.addmm(b.double(), x64, w64.t())
        dx = dy64 @ w64
        if mask_x is not None:
            dx = dx * mask_x
        dw = (dy64.t() @ x64) * mask_w
        return y, dx, dw, dy64.sum(0)


def check_linear(case: LinearCase, device: str, seed: int = 0) -> list[CheckResult]:
    """tq.fq_linear: Triton kernels vs eager composition, rel. error against float64."""
    gen = _gen(device, seed)
    m, n, k = case.shape
    x = (1.5 * torch.randn((m, k), generator=gen, device=device)).to(case.dtype)
    w = torch.randn((n, k), generator=gen, device=device).to(case.dtype)
    b = torch.randn((n,), generator=gen, device=device).to(case.dtype)
    dy = torch.randn((m, n), generator=gen, device=device).to(case.dtype)
    wqp, xqp = _linear_qparams(case, device, gen)
    out_t = _linear_run(x, w, b, dy, wqp, xqp, "triton")
    out_e = _linear_run(x, w, b, dy, wqp, xqp, "eager")
    refs = _linear_reference64(x, w, b, dy, wqp, xqp)
    return [
        _linear_row(case.label, case.shape, case.dtype, metric, t, e, r)
        for metric, t, e, r in zip(("y", "dx", "dw", "db"), out_t, out_e, refs, strict=True)
    ]


# --- converted layers: the integer GEMMs ---------------------------------------------------


@dataclass(frozen=True)
class IntLinearCase:
    """One converted layer (tq.convert of a QAT Linear with `preset`): its integer-GEMM
    kernels (weight-only, W8A8, W4A8) against its eager path."""

    preset: str
    m: int
    n: int
    k: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"convert({self.preset})"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.m, self.n, self.k)


def int_linear_cases(size: str) -> list[IntLinearCase]:
    """Presets x dtypes over one (M, N, K)."""
    m, n, k = {"tiny": (33, 17, 96), "medium": (129, 65, 224)}.get(size, (1024, 4096, 4096))
    presets = ("int8_per_channel", "int4_per_group", "w8a8_dynamic", "w4a8_dynamic")
    return [IntLinearCase(p, m, n, k, dtype) for p in presets for dtype in DTYPES]


def check_int_linear(case: IntLinearCase, device: str, seed: int = 0) -> list[CheckResult]:
    """The converted layer on the Triton backend (integer GEMMs) vs the eager backend
    (dequantize, fake-quantize the input, F.linear); relative error norm against a float64
    product of the eager path's operands, within the dtype's tolerance as the fused linear."""
    from triton_qat.convert import QuantizedLinear

    gen = _gen(device, seed)
    m, n, k = case.shape
    layer = torch.nn.Sequential(torch.nn.Linear(k, n)).to(device=device, dtype=case.dtype)
    x = (1.5 * torch.randn((m, k), generator=gen, device=device)).to(case.dtype)
    with torch.no_grad(), tq.use_backend("eager"):
        qat = tq.prepare_qat(layer, case.preset)
        qat(x)  # the observers see the data once
        converted = tq.convert(qat.eval())
        q = converted[0]
        assert isinstance(q, QuantizedLinear)
        y_eager = converted(x)
        xin = q.fake_quantized_input(x)
        ref = torch.addmm(q.bias.double(), xin.double(), q.dequantized_weight().double().t())
    with torch.no_grad(), tq.use_backend("triton"):
        y = converted(x)
    row = _linear_row(case.label, case.shape, case.dtype, "y", y, y_eager, ref)
    return [dataclasses.replace(row, kind="int_linear")]


# --- observer cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ObserverCase:
    """One fake-quant module, observed over a few steps with the kernels and with the eager code."""

    module: str  # "FakeQuantize" or "FusedMovingAvgObsFakeQuantize"
    observer: str  # the observer class name in triton_qat.fake_quantize
    symmetric: bool
    qrange: tuple[str, int, int]
    shape: tuple[int, ...]
    dtype: torch.dtype
    ch_axis: int | None = None
    group_size: int | None = None

    @property
    def label(self) -> str:
        where = ""
        if self.ch_axis is not None:
            where = f"(axis={self.ch_axis})"
        elif self.group_size is not None:
            where = f"({self.group_size})"
        scheme = "sym" if self.symmetric else "affine"
        fused = "fused " if self.module != "FakeQuantize" else ""
        observer = self.observer.replace("Observer", "").replace("MovingAverage", "MovingAvg")
        return f"{fused}{observer}{where} {scheme} {self.qrange[0]}"

    def build(self) -> torch.nn.Module:
        from triton_qat import fake_quantize as fq

        _, qmin, qmax = self.qrange
        per_tensor = self.ch_axis is None and self.group_size is None
        if self.symmetric:
            qscheme = torch.per_tensor_symmetric if per_tensor else torch.per_channel_symmetric
        else:
            qscheme = torch.per_tensor_affine if per_tensor else torch.per_channel_affine
        kwargs: dict = {
            "quant_min": qmin,
            "quant_max": qmax,
            "dtype": torch.qint8 if qmin < 0 else torch.quint8,
            "qscheme": qscheme,
        }
        if self.ch_axis is not None:
            kwargs["ch_axis"] = self.ch_axis
        if self.group_size is not None:
            kwargs["group_size"] = self.group_size
        module = getattr(fq, self.module)
        return module(observer=getattr(fq, self.observer), **kwargs)


_OBSERVER_METRICS = ("min", "max", "scale", "zp")


def observer_cases(size: str) -> list[ObserverCase]:
    """Observers x granularities x schemes, dtypes and ranges spread over the cases."""
    if size == "tiny":
        t_shape, c_shape, g_shape = (37, 67), (5, 7, 33), (9, 96)
    elif size == "medium":
        t_shape, c_shape, g_shape = (255, 257), (9, 31, 129), (129, 256)
    else:
        t_shape = c_shape = g_shape = (4096, 4096)
    layouts = [
        ("FakeQuantize", "MinMaxObserver", t_shape, None, None),
        ("FakeQuantize", "MovingAverageMinMaxObserver", t_shape, None, None),
        ("FakeQuantize", "PerChannelMinMaxObserver", c_shape, 0, None),
        ("FakeQuantize", "MovingAveragePerChannelMinMaxObserver", c_shape, -1, None),
        ("FakeQuantize", "PerGroupMinMaxObserver", g_shape, None, 32),
        ("FusedMovingAvgObsFakeQuantize", "MovingAverageMinMaxObserver", t_shape, None, None),
        (
            "FusedMovingAvgObsFakeQuantize",
            "MovingAveragePerChannelMinMaxObserver",
            c_shape,
            0,
            None,
        ),
    ]
    cases = []
    for i, (module, observer, shape, axis, group) in enumerate(layouts):
        for j, dtype in enumerate(DTYPES):
            qrange = QUANT_RANGES[(i + j) % len(QUANT_RANGES)]
            cases.append(
                ObserverCase(module, observer, (i + j) % 2 == 0, qrange, shape, dtype, axis, group)
            )
    return cases


def _observer_steps(case: ObserverCase, device: str, seed: int) -> list[Tensor]:
    gen = _gen(device, seed)
    steps = []
    for k in range(3):
        x = torch.randn(case.shape, generator=gen, device=device) * (4.0**k) + (k - 1)
        # The fused formula turns an infinite statistic into a NaN zero point (as torch's op),
        # which fake quant then rejects: specials for the unfused modules only.
        if k == 2 and case.module == "FakeQuantize":
            flat = x.view(-1)
            flat[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
        steps.append(x.to(case.dtype))
    return steps


def check_observer(case: ObserverCase, device: str, seed: int = 0) -> list[CheckResult]:
    """Observe the same inputs with the kernels and with the eager code: min / max and the
    qparams after the last step, bit for bit."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's reduce_range deprecation and the like
        kernel_fq = case.build().to(device)
    eager_fq = copy.deepcopy(kernel_fq)
    steps = _observer_steps(case, device, seed)
    for module, backend in ((kernel_fq, "triton"), (eager_fq, "eager")):
        with tq.use_backend(backend):
            for x in steps:
                module.observe(x)
    values = []
    for module in (kernel_fq, eager_fq):
        observer = module.activation_post_process
        values.append((observer.min_val, observer.max_val, module.scale, module.zero_point))
    dtype = DTYPE_NAMES[case.dtype]
    return [
        _bit_exact_row("observer", case.label, case.shape, dtype, metric, actual, expected)
        for metric, actual, expected in zip(_OBSERVER_METRICS, *values, strict=True)
    ]


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
