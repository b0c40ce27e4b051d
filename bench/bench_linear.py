"""Benchmark the fused fake-quant linear (tq.fq_linear) against torch's ways of doing QAT on CUDA.

    PYTHONPATH=. python bench/bench_linear.py --out bench/results/latest [--quick] [--budget-s S]
        [--qconfig NAME ...]

Shapes x (M, K) @ w (N, K)^T: M in {8192, 1024}, (N, K) in {(4096, 4096), (14336, 4096)},
bfloat16 activations. The headline qconfig, int8 per-channel weights (symmetric, -128..127,
zero point 0, scale = abs max of the row / 127), runs on every shape with five providers:
torch_linear (plain bf16 F.linear, the floor), torch_ao_qat (torch.ao.nn.qat.Linear with the
x86 QAT qconfig, fp32 master weights under autocast), eager_compiled (torch.compile of
F.linear over torch.fake_quantize_per_channel_affine), triton_qat (tq.fq_linear, Triton
backend, bf16 weights) and triton_qat_fp32_master (fp32 master weights under autocast, the
setting of torch_ao_qat). Six more qconfigs run on the headline shape 8192x4096x4096 only,
with eager_compiled and triton_qat: int4 per group of 128 (0..15, zero points), w8a8_static
(the int8 weights plus static per-tensor int8 input fake quant), w8a8_dynamic (the int8
weights plus dynamic per-token symmetric int8 input fake quant, the preset of that name) and
w4a8_dynamic (the preset: int4 symmetric weights per group of 32, dynamic per-token affine
int8 input fake quant). The two dynamic qconfigs also run triton_qat_float_fwd: the float
forward side by side with the integer one. fp8_dynamic and fp8_weight_only (tq.fp8_linear:
e4m3fn weight per row, the input per token or float; eager_compiled is torch.compile of
F.linear over the FP8 reference, torch's float8 casts); fp8_dynamic also runs
triton_qat_fp32_master and triton_qat_fp8_float_fwd (the float GEMM reading float8 codes,
against the FP8 tensor-core forward). Its targets: forward <= 0.6x and forward + backward
<= 1.0x torch_linear on 8192x4096x4096 bf16. --qconfig NAME (repeatable) runs only those
qconfigs.

Benches: linear_fwd (the forward of a training step: autograd on, what the backward needs
saved) and linear_fwd_bwd (forward, then y.backward(dy) with grads for input, weight and bias,
reset to None between timed runs). The first Triton call per shape, which compiles and
autotunes the three kernels, is timed on its own (first_call_s); torch.compile's warm-up
likewise (compile_s); neither is in the timings.
Before timing, each Triton row's output and gradients are compared with triton_qat's eager
backend on the same tensors (relative error norm <= 2**-8).

Writes OUT/linear.json (a list of records, fields in bench/README.md) after every
(shape, qconfig), so a run cut short keeps what it measured, and prints a table at the end.
--budget-s: no new (shape, qconfig) starts once fewer than MIN_UNIT_S seconds of it are left;
the headline one always runs.
Exit status: 0 all rows timed and checked, 1 a check over the limit, a failed triton_qat or
torch_linear row, or rows skipped for time; 2 no CUDA (one line on stderr).
Nothing touches CUDA, or imports Triton, before main() has checked that a GPU is there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _gpu_run import EXIT_NO_CUDA, card_slug, gpu_run_metadata
from torch import Tensor

DEVICE = "cuda"
DTYPE = torch.bfloat16
EXIT_FAILED = 1

# (M, N, K), the headline first: a run cut short by the budget still has it.
SHAPES: tuple[tuple[int, int, int], ...] = (
    (8192, 4096, 4096),
    (8192, 14336, 4096),
    (1024, 4096, 4096),
    (1024, 14336, 4096),
)
QUICK_SHAPES: tuple[tuple[int, int, int], ...] = ((8192, 4096, 4096),)
EXTRA_QCONFIG_SHAPE = (8192, 4096, 4096)

INT8_PC = "int8_per_channel"
GROUP_SIZE = 128
INT4_GROUP = f"int4_per_group{GROUP_SIZE}"
W8A8 = "w8a8_static"
W8A8_DYNAMIC = "w8a8_dynamic"
W4A8_DYNAMIC = "w4a8_dynamic"
FP8_DYNAMIC = "fp8_dynamic"
FP8_WEIGHT_ONLY = "fp8_weight_only"
QCONFIGS = (INT8_PC, INT4_GROUP, W8A8, W8A8_DYNAMIC, W4A8_DYNAMIC, FP8_DYNAMIC, FP8_WEIGHT_ONLY)
DYNAMIC_QCONFIGS = (W8A8_DYNAMIC, W4A8_DYNAMIC)
# FP8 presets: tq.fp8_linear (e4m3fn weight per row; fp8_dynamic adds e4m3fn per token input).
FP8_QCONFIGS = (FP8_DYNAMIC, FP8_WEIGHT_ONLY)

TORCH_LINEAR = "torch_linear"
TORCH_AO = "torch_ao_qat"
COMPILED = "eager_compiled"
TQ = "triton_qat"
TQ_MASTER = "triton_qat_fp32_master"
# w8a8_dynamic with the float forward (TRITON_QAT_INT8_FORWARD=0): the int8 forward's gain.
TQ_FLOAT_FWD = "triton_qat_float_fwd"
# int8_per_channel with W fake-quantized inside the forward and dX GEMMs
# (TRITON_QAT_CODES=0), against W's int8 codes written by one pass (the default).
TQ_IN_GEMM = "triton_qat_in_gemm_fq"
# w4a8_dynamic with the per-group int8 forward (TRITON_QAT_INT8_FORWARD=group), against the
# float forward it runs by default.
TQ_INT8_GROUP = "triton_qat_int8_group_fwd"
# fp8_dynamic with the float GEMM reading the float8 codes (TRITON_QAT_FP8_FORWARD=0), against
# the FP8 tensor-core forward it runs by default.
TQ_FP8_FLOAT_FWD = "triton_qat_fp8_float_fwd"
# The environment each variant runs its forward and backward under, and its record's note.
VARIANT_ENV = {
    TQ_FLOAT_FWD: ({"TRITON_QAT_INT8_FORWARD": "0"}, "forward on the float kernels (no int8 GEMM)"),
    TQ_FP8_FLOAT_FWD: (
        {"TRITON_QAT_FP8_FORWARD": "0"},
        "forward on the float GEMM reading float8 codes (no FP8 tensor-core GEMM)",
    ),
    TQ_INT8_GROUP: (
        {"TRITON_QAT_INT8_FORWARD": "group"},
        "forward: the per-group int8 GEMM (int4 x int8 codes)",
    ),
    TQ_IN_GEMM: (
        {"TRITON_QAT_CODES": "0"},
        "W fake-quantized inside the forward / dX GEMMs (no codes pass)",
    ),
}
PROVIDERS = (TORCH_LINEAR, TORCH_AO, COMPILED, TQ, TQ_MASTER)
# Rows whose failure is a failure of this package (or of the floor every ratio needs).
OWN_PROVIDERS = (
    TQ,
    TQ_MASTER,
    TQ_FLOAT_FWD,
    TQ_IN_GEMM,
    TQ_INT8_GROUP,
    TQ_FP8_FLOAT_FWD,
    TORCH_LINEAR,
)
PROVIDERS_BY_QCONFIG = {
    INT8_PC: (*PROVIDERS, TQ_IN_GEMM),
    # torch.ao has no per-group weight fake quant, and its qat.Linear never fake-quantizes
    # its input; torch_linear is the same floor as in the int8_per_channel rows.
    INT4_GROUP: (COMPILED, TQ),
    W8A8: (COMPILED, TQ),
    W8A8_DYNAMIC: (COMPILED, TQ, TQ_FLOAT_FWD),
    W4A8_DYNAMIC: (COMPILED, TQ, TQ_INT8_GROUP, TQ_IN_GEMM),
    # eager_compiled: torch.compile of F.linear over the FP8 reference (torch's float8 casts).
    # torch_linear again: a run of the FP8 rows alone (gpu_check's bench_fp8) has its floor.
    FP8_DYNAMIC: (TORCH_LINEAR, COMPILED, TQ, TQ_MASTER, TQ_FP8_FLOAT_FWD),
    FP8_WEIGHT_ONLY: (COMPILED, TQ),
}

FWD = "linear_fwd"
FWD_BWD = "linear_fwd_bwd"
BENCHES = (FWD, FWD_BWD)

REL_ERR_LIMIT = 2.0**-8  # bf16 outputs and gradients against the eager reference
QUANTILES = [0.5, 0.2, 0.8]
# do_bench warmup / repetition budgets in ms; --quick trades precision for time.
FULL_TIMING = {"warmup": 25, "rep": 100}
QUICK_TIMING = {"warmup": 10, "rep": 30}
DEFAULT_BUDGET_S = 150.0
# Rough cost of one more (shape, qconfig): autotuning 3 kernels x 11 configs plus timing.
MIN_UNIT_S = 25.0


@dataclass
class Tensors:
    """One shape's operands: bf16 activations, bf16 weight and bias, their fp32 masters."""

    x: Tensor
    w: Tensor
    b: Tensor
    w_master: Tensor
    b_master: Tensor
    dy: Tensor


@dataclass
class Provider:
    """One way to run the layer: `forward` runs it on its own leaves (autocast inside)."""

    name: str
    forward: Callable[[], Tensor]
    leaves: list[Tensor]
    backend: str | None = None  # a triton_qat backend to run forward and backward under
    fields: dict = field(default_factory=dict)  # extra record fields (note, check, ...)
    env: dict = field(default_factory=dict)  # environment variables set while it runs

    @contextlib.contextmanager
    def context(self):
        before = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        try:
            if self.backend is None:
                yield
            else:
                import triton_qat as tq

                with tq.use_backend(self.backend):
                    yield
        finally:
            for name, value in before.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def root_cause(err: BaseException) -> str:
    """one_line of the innermost cause: torch.compile wraps the error that matters."""
    while err.__cause__ is not None:
        err = err.__cause__
    return one_line(err)


def device_type() -> str:
    return torch.device(DEVICE).type


def autocast() -> torch.autocast:
    return torch.autocast(device_type(), dtype=DTYPE)


def synchronize() -> None:
    if device_type() == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if device_type() == "cuda":
        torch.cuda.empty_cache()


def make_tensors(shape: tuple[int, int, int]) -> Tensors:
    m, n, k = shape
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*size: int, std: float = 1.0) -> Tensor:
        return torch.randn(size, generator=gen, device=DEVICE, dtype=torch.float32) * std

    w_master = randn(n, k, std=k**-0.5)  # nn.Linear-like magnitude
    b_master = randn(n, std=0.1)
    return Tensors(
        x=randn(m, k).to(DTYPE),
        w=w_master.to(DTYPE),
        b=b_master.to(DTYPE),
        w_master=w_master,
        b_master=b_master,
        dy=randn(m, n).to(DTYPE),
    )


def weight_qparams(qconfig: str, w: Tensor):
    """int8 per channel: symmetric, scale = row abs max / 127, zp 0. int4 per group of 128:
    asymmetric 0..15 from each group's min and max (0 included), zero points 0..15.
    w4a8_dynamic: the preset's weight fake quant (int4 -8..7 symmetric per group of 32,
    scale = group abs max / 7.5, zp 0) after observing w once."""
    import triton_qat as tq

    wf = w.detach().float()
    n, k = wf.shape
    if qconfig == W4A8_DYNAMIC:
        fq = tq.get_qconfig(W4A8_DYNAMIC).weight().to(w.device)
        with torch.no_grad():
            fq(wf)
        return fq.qparams()
    if qconfig == INT4_GROUP:
        groups = wf.view(n, k // GROUP_SIZE, GROUP_SIZE)
        lo = groups.amin(dim=-1).clamp(max=0.0)
        hi = groups.amax(dim=-1).clamp(min=0.0)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        zp = torch.round(-lo / scale).clamp(0, 15).to(torch.int32)
        return tq.QParams(scale, zp, 0, 15, group_size=GROUP_SIZE)
    scale = (wf.abs().amax(dim=1) / 127).clamp_min(1e-8)
    zp = torch.zeros(n, dtype=torch.int32, device=w.device)
    return tq.QParams(scale, zp, -128, 127, axis=0)


def input_qparams(qconfig: str, x: Tensor):
    """w8a8_static: one int8 scale for the input, fixed beforehand (x's abs max / 127), zp 0.
    w8a8_dynamic / w4a8_dynamic: the preset's per-token spec (each row's qparams computed per
    call; symmetric / affine)."""
    import triton_qat as tq

    if qconfig in DYNAMIC_QCONFIGS:
        return tq.get_qconfig(qconfig).activation().per_token_spec()
    if qconfig != W8A8:
        return None
    return tq.QParams(max(float(x.detach().abs().amax().float()) / 127, 1e-8), 0, -128, 127)


def torch_composition(wqp, xqp, upcast: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """F.linear over torch's own fake-quant ops: what a user would write and torch.compile.

    Per group: torch's per-channel op on the (-1, group) view, the same parameter layout.
    upcast: fake-quantize the input in fp32 (for a torch that refuses bf16); autocast casts
    it back for the matmul.
    """
    from triton_qat.numerics.qparams import PerTokenQParams
    from triton_qat.numerics.reference import per_token_qparams_ref

    w_scale, w_zp = wqp.scale.reshape(-1), wqp.zero_point.reshape(-1)
    group = wqp.group_size

    def linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        if isinstance(xqp, PerTokenQParams):
            xf = x.float() if upcast else x
            if xqp.symmetric:
                # Symmetric per token, torch.ao's formula: scale = max(row abs max / 127.5, eps).
                amax = xf.detach().abs().amax(dim=1).float()
                half_range = (xqp.quant_max - xqp.quant_min) / 2
                scale = torch.clamp_min(amax / half_range, xqp.eps)
                zp = torch.zeros_like(scale, dtype=torch.int32)
            else:
                # Affine per token (w4a8_dynamic): torch.ao's formula, as the reference has it.
                scale, zp = per_token_qparams_ref(
                    xf.detach(), xqp.quant_min, xqp.quant_max, False, 0, xqp.eps
                )
            x = torch.fake_quantize_per_channel_affine(
                xf, scale, zp, 0, xqp.quant_min, xqp.quant_max
            )
        elif xqp is not None:
            x = torch.fake_quantize_per_tensor_affine(
                x.float() if upcast else x,
                xqp.scale,
                xqp.zero_point,
                xqp.quant_min,
                xqp.quant_max,
            )
        wv = w.reshape(-1, group) if group else w
        wq = torch.fake_quantize_per_channel_affine(
            wv, w_scale, w_zp, 0, wqp.quant_min, wqp.quant_max
        ).reshape(w.shape)
        return F.linear(x, wq, b)

    return linear


def fp8_composition(qconfig: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """F.linear over the FP8 reference fake quant (torch's float8 casts, scale from amax):
    the weight per row, the input per token (fp8_dynamic) or as is (fp8_weight_only); the
    fake-quantized copies are what other libraries make. Straight through, as fp8_linear."""
    from triton_qat.numerics.float_formats import (
        fake_quantize_float8_dynamic_ref,
        float8_format,
    )

    fmt = float8_format("float8_e4m3fn")

    def ste(v: Tensor, granularity: str) -> Tensor:
        fq = fake_quantize_float8_dynamic_ref(v.detach(), fmt, granularity)
        return v + (fq - v).detach()

    def linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        if qconfig == FP8_DYNAMIC:
            x = ste(x, "per_token")
        return F.linear(x, ste(w, "per_row").to(x.dtype), b)

    return linear


def fp8_kwargs(qconfig: str) -> dict:
    """tq.fp8_linear's arguments for an FP8 preset (its defaults: e4m3fn per row / per token)."""
    return {} if qconfig == FP8_DYNAMIC else {"input_dtype": None}


def leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def run_step(p: Provider, dy: Tensor, backend: str | None = None) -> tuple[Tensor, list]:
    """One training step (forward, backward(dy)); returns y and the leaves' grads."""
    import triton_qat as tq

    for t in p.leaves:
        t.grad = None
    ctx = tq.use_backend(backend) if backend else p.context()
    with ctx:
        y = p.forward()
        y.backward(dy)
    grads = [t.grad for t in p.leaves]
    for t in p.leaves:
        t.grad = None
    return y.detach(), grads


def rel_err(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want||, in fp32."""
    want32 = want.float()
    diff = torch.linalg.vector_norm(got.float() - want32)
    return float(diff / torch.linalg.vector_norm(want32).clamp_min(1e-30))


def build_torch_linear(t: Tensors, qconfig: str) -> Provider:
    x, w, b = leaf(t.x), leaf(t.w), leaf(t.b)
    return Provider(
        TORCH_LINEAR, lambda: F.linear(x, w, b), [x, w, b], fields={"weight_dtype": "bfloat16"}
    )


def build_torch_ao(t: Tensors, qconfig: str) -> Provider:
    """torch.ao.nn.qat.Linear, x86 QAT qconfig, in training mode (observer on every call)."""
    n, k = t.w.shape
    with warnings.catch_warnings():  # torch.ao's deprecation notices are not our news
        warnings.simplefilter("ignore")
        import torch.ao.nn.qat as nnqat
        from torch.ao.quantization import get_default_qat_qconfig

        mod = nnqat.Linear(
            k, n, bias=True, qconfig=get_default_qat_qconfig("x86"), device=DEVICE
        ).to(DEVICE)
    with torch.no_grad():
        mod.weight.copy_(t.w_master)
        mod.bias.copy_(t.b_master)
    x = leaf(t.x)

    def forward() -> Tensor:
        with autocast():
            return mod(x)

    p = Provider(
        TORCH_AO,
        forward,
        [x, mod.weight, mod.bias],
        fields={
            "weight_dtype": "float32",
            "note": "torch.ao x86 QAT qconfig: per-channel symmetric qint8 weight, "
            "moving-average observer updated every call; fp32 master weights under autocast",
        },
    )
    run_step(p, t.dy)  # fails here, not in the timing, if torch.ao cannot run it
    return p


def build_compiled(t: Tensors, qconfig: str) -> Provider:
    """torch.compile of the composition, bf16 weight; fp32 weight under autocast if torch's
    fake-quant ops refuse bf16. Warm-up (compilation, forward and backward graphs) timed as
    compile_s."""
    refused = None
    for upcast in (False, True):
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, static shapes
        w_src = t.w_master if upcast else t.w
        b_src = t.b_master if upcast else t.b
        if qconfig in FP8_QCONFIGS:
            wqp, composition = None, fp8_composition(qconfig)
        else:
            wqp = weight_qparams(qconfig, w_src)
            composition = torch_composition(wqp, input_qparams(qconfig, t.x), upcast)
        compiled = torch.compile(composition, dynamic=False)
        x, w, b = leaf(t.x), leaf(w_src), leaf(b_src)

        def forward(compiled=compiled, x=x, w=w, b=b, upcast=upcast) -> Tensor:
            with autocast() if upcast else contextlib.nullcontext():
                return compiled(x, w, b)

        notes = []
        if wqp is not None and wqp.group_size:
            notes.append(
                "per group via torch.fake_quantize_per_channel_affine on the "
                f"(-1, {wqp.group_size}) view"
            )
        if upcast:
            notes.append(f"torch refused bf16 ({refused}); fp32 weight under autocast")
        p = Provider(
            COMPILED,
            forward,
            [x, w, b],
            fields={
                "weight_dtype": "float32" if upcast else "bfloat16",
                "note": "; ".join(notes) or None,
            },
        )
        try:
            # Eager first: its error names the dtype; torch.compile's wraps it in a page.
            with torch.no_grad(), autocast() if upcast else contextlib.nullcontext():
                composition(x, w, b)
            synchronize()
            start = time.perf_counter()
            run_step(p, t.dy)  # one graph serves both benches: their forwards are the same
            synchronize()
        except Exception as err:
            if upcast:
                raise RuntimeError(
                    f"bf16: {refused}; fp32 under autocast: {root_cause(err)}"
                ) from err
            refused = root_cause(err)
            continue
        p.fields["compile_s"] = time.perf_counter() - start
        return p
    raise AssertionError("unreachable")


def build_triton(t: Tensors, qconfig: str, master: bool, variant: str | None = None) -> Provider:
    """tq.fq_linear, Triton backend. The first step (compile + autotune) is timed as
    first_call_s; its y and grads are checked against the eager backend. variant: a key of
    VARIANT_ENV, whose environment is set while each step runs (Provider.context)."""
    import triton_qat as tq

    w_src = t.w_master if master else t.w
    b_src = t.b_master if master else t.b
    x, w, b = leaf(t.x), leaf(w_src), leaf(b_src)
    if qconfig in FP8_QCONFIGS:
        kwargs = fp8_kwargs(qconfig)

        def linear() -> Tensor:
            return tq.fp8_linear(x, w, b, **kwargs)
    else:
        wqp = weight_qparams(qconfig, w_src)
        xqp = input_qparams(qconfig, t.x)

        def linear() -> Tensor:
            return tq.fq_linear(x, w, b, weight_qparams=wqp, input_qparams=xqp)

    def forward() -> Tensor:
        if master:
            with autocast():
                return linear()
        return linear()

    p = Provider(
        variant or (TQ_MASTER if master else TQ),
        forward,
        [x, w, b],
        backend="triton",
        env=VARIANT_ENV[variant][0] if variant else {},
        fields={
            "weight_dtype": "float32" if master else "bfloat16",
            "note": "fp32 master weights under autocast"
            if master
            else (VARIANT_ENV[variant][1] if variant else None),
        },
    )
    synchronize()
    start = time.perf_counter()
    y_tq, g_tq = run_step(p, t.dy)
    synchronize()
    p.fields["first_call_s"] = time.perf_counter() - start
    y_ref, g_ref = run_step(p, t.dy, backend="eager")
    p.fields["check_rel_err"] = rel_err(y_tq, y_ref)
    p.fields["check_rel_err_grad"] = max(rel_err(a, b) for a, b in zip(g_tq, g_ref, strict=True))
    return p


BUILDERS: dict[str, Callable[[Tensors, str], Provider]] = {
    TORCH_LINEAR: build_torch_linear,
    TORCH_AO: build_torch_ao,
    COMPILED: build_compiled,
    TQ: lambda t, q: build_triton(t, q, master=False),
    TQ_MASTER: lambda t, q: build_triton(t, q, master=True),
    TQ_FLOAT_FWD: lambda t, q: build_triton(t, q, master=False, variant=TQ_FLOAT_FWD),
    TQ_IN_GEMM: lambda t, q: build_triton(t, q, master=False, variant=TQ_IN_GEMM),
    TQ_INT8_GROUP: lambda t, q: build_triton(t, q, master=False, variant=TQ_INT8_GROUP),
    TQ_FP8_FLOAT_FWD: lambda t, q: build_triton(t, q, master=False, variant=TQ_FP8_FLOAT_FWD),
}


def forward_fn(p: Provider) -> Callable[[], object]:
    """The forward of a training step: autograd on, tensors saved for a backward never run."""

    def run() -> Tensor:
        with p.context():
            return p.forward()

    return run


def train_step_fn(p: Provider, dy: Tensor) -> Callable[[], object]:
    def run() -> None:
        with p.context():
            p.forward().backward(dy)

    return run


def time_ms(fn: Callable[[], object], grad_to_none: list, timing: dict) -> list[float]:
    """[median, p20, p80] in ms from triton.testing.do_bench (L2 flushed before each run)."""
    import triton.testing

    return triton.testing.do_bench(
        fn, grad_to_none=grad_to_none or None, quantiles=QUANTILES, **timing
    )


def peak_extra_mb(fn: Callable[[], object], grad_to_none: list) -> float | None:
    """Peak CUDA memory of one call above what was live before it (inputs excluded), MiB."""
    if device_type() != "cuda":
        return None
    for t in grad_to_none:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    for t in grad_to_none:
        t.grad = None
    return (peak - base) / 2**20


def flops(shape: tuple[int, int, int], bench: str) -> int:
    """2MNK for the forward; the backward adds dx and dw, 4MNK (the bias is noise)."""
    m, n, k = shape
    return (2 if bench == FWD else 6) * m * n * k


def bench_case(
    shape: tuple[int, int, int], qconfig: str, timing: dict, meta: dict
) -> tuple[list[dict], list[str], list[str]]:
    """All rows of one (shape, qconfig): every provider, forward and forward+backward."""
    t = make_tensors(shape)
    records: list[dict] = []
    problems: list[str] = []
    notes: list[str] = []
    label = f"{'x'.join(map(str, shape))} {qconfig}"

    def fail(provider: str, what: str, err: str) -> None:
        line = f"{what} {label} {provider}: {err}"
        (problems if provider in OWN_PROVIDERS else notes).append(
            ("FAILED " if provider in OWN_PROVIDERS else "NOTE ") + line
        )

    for name in PROVIDERS_BY_QCONFIG[qconfig]:
        base = {
            "shape": list(shape),
            "dtype": dtype_name(DTYPE),
            "qconfig": qconfig,
            "provider": name,
            "ms": None,
            "ms_p20": None,
            "ms_p80": None,
            "tflops": None,
            "peak_mem_mb": None,
            "ratio_to_torch_linear": None,
            **meta,
        }
        try:
            p = BUILDERS[name](t, qconfig)
        except Exception as err:  # a provider that cannot run this case is a row, not a crash
            msg = one_line(err)
            fail(name, "setup", msg)
            records += [{"bench": bench, **base, "error": msg} for bench in BENCHES]
            empty_cache()
            continue
        check = p.fields.get("check_rel_err")
        if check is not None:
            worst = max(check, p.fields["check_rel_err_grad"])
            if not worst <= REL_ERR_LIMIT:  # NaN fails too
                problems.append(
                    f"MISMATCH {label} {name}: relative error {check:.3g} (output), "
                    f"{p.fields['check_rel_err_grad']:.3g} (grads) vs eager, limit 2**-8"
                )
        for bench in BENCHES:
            rec = {"bench": bench, **base, **{k: v for k, v in p.fields.items() if v is not None}}
            if bench == FWD:
                fn, grads = forward_fn(p), []
            else:
                fn, grads = train_step_fn(p, t.dy), p.leaves
            try:
                ms, p20, p80 = time_ms(fn, grads, timing)
                rec.update(
                    ms=ms,
                    ms_p20=p20,
                    ms_p80=p80,
                    tflops=flops(shape, bench) / (ms * 1e-3) / 1e12,
                    peak_mem_mb=peak_extra_mb(fn, grads),
                )
            except Exception as err:
                rec["error"] = one_line(err)
                fail(name, bench, rec["error"])
            records.append(rec)
        del p, fn, grads
        empty_cache()
    del t
    return records, problems, notes


def add_ratios(records: list[dict]) -> None:
    """ratio_to_torch_linear: ms / torch_linear's ms for the same shape and bench."""
    floor = {
        (tuple(r["shape"]), r["bench"]): r["ms"]
        for r in records
        if r["provider"] == TORCH_LINEAR and r["ms"]
    }
    for r in records:
        ref = floor.get((tuple(r["shape"]), r["bench"]))
        r["ratio_to_torch_linear"] = r["ms"] / ref if ref and r["ms"] else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def finite(record: dict) -> dict:
    """NaN or inf would make the JSON invalid for strict readers: write null instead."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def write_json(path: Path, records: list[dict]) -> None:
    """Replace `path` in one step, so a run killed mid-write leaves the previous version."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([finite(r) for r in records], indent=1) + "\n")
    tmp.replace(path)


def format_table(records: list[dict]) -> str:
    head = (
        f"{'bench':<15} {'qconfig':<17} {'M x N x K':<16} {'provider':<23} {'ms':>8} "
        f"{'TFLOPS':>7} {'x floor':>7} {'peakMB':>8} {'rel err':>8} {'1st s':>6}"
    )
    lines = [head, "-" * len(head)]

    def num(v, fmt: str) -> str:
        width = int(fmt.split(".")[0])
        return "-".rjust(width) if v is None else format(v, fmt)

    for r in records:
        shape = "x".join(str(s) for s in r["shape"])
        first = r.get("first_call_s", r.get("compile_s"))
        lines.append(
            f"{r['bench']:<15} {r['qconfig']:<17} {shape:<16} {r['provider']:<23} "
            f"{num(r['ms'], '8.4f')} {num(r['tflops'], '7.1f')} "
            f"{num(r['ratio_to_torch_linear'], '7.2f')} {num(r['peak_mem_mb'], '8.1f')} "
            f"{num(r.get('check_rel_err'), '8.1e')} {num(first, '6.1f')}"
            + (f"  ERROR {r['error']}" if r.get("error") else "")
        )
    return "\n".join(lines)


def plan(quick: bool, only: list[str] | None = None) -> list[tuple[tuple[int, int, int], str]]:
    """(shape, qconfig) units in run order: per shape the headline qconfig, then the extras;
    `only`: just those qconfigs."""
    units = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        units.append((shape, INT8_PC))
        if shape == EXTRA_QCONFIG_SHAPE:
            units += [(shape, q) for q in QCONFIGS if q != INT8_PC]
    if only:
        units = [u for u in units if u[1] in only]
    return units


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/latest"),
        help="folder for linear.json (created if missing)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="8192x4096x4096 only, shorter timing (a smoke run)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"start no new (shape, qconfig) with fewer than {MIN_UNIT_S:.0f} s of this left "
        f"(default {DEFAULT_BUDGET_S:.0f})",
    )
    p.add_argument(
        "--qconfig",
        action="append",
        choices=QCONFIGS,
        help="run only this qconfig (repeatable; default: all)",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace, meta: dict) -> int:
    """Every (shape, qconfig) in plan order; the device checks are main()'s."""
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "linear.json"
    start = time.monotonic()
    records: list[dict] = []
    problems: list[str] = []
    for i, (shape, qconfig) in enumerate(plan(args.quick, args.qconfig)):
        label = f"{'x'.join(map(str, shape))} {qconfig}"
        left = args.budget_s - (time.monotonic() - start)
        if i > 0 and left < MIN_UNIT_S:
            problems.append(
                f"SKIPPED {label}: {left:.0f} s of the {args.budget_s:.0f} s budget left"
            )
            print(f"  {label}: skipped, {left:.0f} s left", flush=True)
            continue
        print(f"  {label} ... ({time.monotonic() - start:.0f} s)", flush=True)
        try:
            recs, probs, notes = bench_case(shape, qconfig, timing, meta)
        except Exception as err:  # e.g. out of memory: keep the rows of the other cases
            recs, probs, notes = [], [f"FAILED {label}: {one_line(err)}"], []
        empty_cache()
        records += recs
        problems += probs
        for line in probs + notes:
            print(f"    {line}", flush=True)
        add_ratios(records)
        write_json(path, records)

    add_ratios(records)
    write_json(path, records)
    print(format_table(records))
    print(f"wrote {len(records)} records to {path} in {time.monotonic() - start:.0f} s")
    if problems:
        print(f"bench_linear: {len(problems)} problem(s):", *problems, sep="\n  ")
        return EXIT_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = gpu_run_metadata("bench_linear")
    if meta is None:
        return EXIT_NO_CUDA
    gpu = meta["gpu"]
    print(f"bench_linear: {gpu}, torch {meta['torch']}, triton {meta['triton']}", flush=True)
    rc = run(args, meta)
    print(f"commit figures under bench/results/{card_slug(gpu)}/ (see bench/README.md)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
