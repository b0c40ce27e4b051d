"""Benchmark the standalone fake-quant Triton kernels against torch's fake-quant ops on CUDA.

    PYTHONPATH=. python bench/bench_fake_quant.py --out bench/results/latest [--quick]

Rows: int8 (-128..127) fake quant per channel along axis 0 (the headline), per tensor and per
group of 128, each forward only and forward+backward through autograd, for triton_qat's Triton
backend and for torch.fake_quantize_per_{channel,tensor}_affine (per group: torch's
per-channel op on the (-1, 128) view, the same parameter layout). One y.copy_(x) row per shape
and dtype gives the card's copy bandwidth in the same run; every other row is reported as a
percentage of it. Before anything is timed, the Triton output and gradient are checked bit for
bit against triton_qat's eager backend on the same CUDA tensors (torch's CUDA per-channel op
adds the zero point before rounding, so it is not the oracle here).

Writes OUT/fake_quant.json (a list of records, fields in bench/README.md) and prints a table.
Exit status: 0 all rows timed and bit-exact, 1 a bitwise mismatch or a failed row, 2 no CUDA.
Nothing touches CUDA, or imports Triton, before main() has checked that a GPU is there.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _gpu_run import EXIT_NO_CUDA, card_slug, gpu_run_metadata
from torch import Tensor

DEVICE = "cuda"
EXIT_MISMATCH = 1

QUANT_MIN, QUANT_MAX = -128, 127
GROUP_SIZE = 128
SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (16384, 8192))
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096),)
DTYPES = (torch.bfloat16, torch.float32)
QCONFIGS = ("int8_per_channel_axis0", "int8_per_tensor", f"int8_per_group{GROUP_SIZE}")
QUANTILES = [0.5, 0.2, 0.8]
# do_bench warmup / repetition budgets in ms; --quick trades precision for time.
FULL_TIMING = {"warmup": 25, "rep": 100}
QUICK_TIMING = {"warmup": 10, "rep": 30}

TQ = "triton_qat"
TORCH = "torch"
COPY = "torch_copy"
FWD = "fake_quant_fwd"
FWD_BWD = "fake_quant_fwd_bwd"
COPY_BENCH = "copy"


@dataclass
class Case:
    """One qconfig on one input: the two implementations and the bytes an ideal one moves."""

    qconfig: str
    tq_op: Callable[[Tensor], Tensor]
    torch_op: Callable[[Tensor], Tensor]
    param_bytes: int


def _int_dtype(dtype: torch.dtype) -> torch.dtype:
    return {4: torch.int32, 2: torch.int16}[torch.empty((), dtype=dtype).element_size()]


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Same shape, dtype and bits (signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.contiguous().view(_int_dtype(a.dtype)), b.contiguous().view(_int_dtype(b.dtype))
    )


def make_case(qconfig: str, x: Tensor, gen: torch.Generator) -> Case:
    """Qparams with realistic scales (a few values clamp) and nonzero zero points."""
    import triton_qat as tq

    rows, cols = x.shape
    dev = x.device
    if qconfig == "int8_per_channel_axis0":
        scale = (x.abs().amax(dim=1).float() / 100).clamp_min(1e-6)
        zp = torch.randint(-8, 9, (rows,), generator=gen, device=dev, dtype=torch.int32)
        return Case(
            qconfig,
            lambda t: tq.fake_quantize_per_channel(t, scale, zp, 0, QUANT_MIN, QUANT_MAX),
            lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp, 0, QUANT_MIN, QUANT_MAX),
            param_bytes=rows * (4 + 4),
        )
    if qconfig == "int8_per_tensor":
        scale_f = max(float(x.abs().amax().float()) / 100, 1e-6)
        zp_i = 3
        return Case(
            qconfig,
            lambda t: tq.fake_quantize_per_tensor(t, scale_f, zp_i, QUANT_MIN, QUANT_MAX),
            lambda t: torch.fake_quantize_per_tensor_affine(t, scale_f, zp_i, QUANT_MIN, QUANT_MAX),
            param_bytes=4 + 4,
        )
    if qconfig == f"int8_per_group{GROUP_SIZE}":
        groups = (rows, cols // GROUP_SIZE)
        amax = x.view(rows, groups[1], GROUP_SIZE).abs().amax(dim=-1).float()
        scale = (amax / 100).clamp_min(1e-6)
        zp = torch.randint(-8, 9, groups, generator=gen, device=dev, dtype=torch.int32)
        flat_scale, flat_zp = scale.view(-1), zp.view(-1)
        return Case(
            qconfig,
            lambda t: tq.fake_quantize_per_group(t, scale, zp, GROUP_SIZE, QUANT_MIN, QUANT_MAX),
            # torch has no per-group op; per channel over the (-1, group) view is the same layout.
            lambda t: torch.fake_quantize_per_channel_affine(
                t.view(-1, GROUP_SIZE), flat_scale, flat_zp, 0, QUANT_MIN, QUANT_MAX
            ).view(t.shape),
            param_bytes=scale.numel() * (4 + 4),
        )
    raise ValueError(f"unknown qconfig {qconfig!r}")


def forward_fn(op: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Callable[[], object], list]:
    return (lambda: op(x)), []


def forward_backward_fn(
    op: Callable[[Tensor], Tensor], x: Tensor, dy: Tensor
) -> tuple[Callable[[], object], list]:
    """op(x) then backward(dy) through autograd; x.grad is reset between timed runs."""
    xr = x.detach().requires_grad_()

    def run() -> None:
        op(xr).backward(dy)

    return run, [xr]


def verify(case: Case, x: Tensor, dy: Tensor) -> list[str]:
    """Triton vs eager backend of triton_qat, forward output and input gradient, bitwise."""
    import triton_qat as tq

    problems = []
    outs, grads = {}, {}
    for backend in ("triton", "eager"):
        with tq.use_backend(backend):
            outs[backend] = case.tq_op(x)
            xr = x.detach().requires_grad_()
            case.tq_op(xr).backward(dy)
            grads[backend] = xr.grad
    for what, got in (("forward", outs), ("backward", grads)):
        if not bitwise_equal(got["triton"], got["eager"]):
            a, b = got["triton"], got["eager"]
            n = int((a.view(_int_dtype(a.dtype)) != b.view(_int_dtype(b.dtype))).sum())
            problems.append(
                f"MISMATCH {case.qconfig} {tuple(x.shape)} {dtype_name(x.dtype)} {what}: "
                f"{n} of {a.numel()} elements differ from the eager reference"
            )
    return problems


def peak_extra_mb(fn: Callable[[], object], grad_to_none: list) -> float:
    """Peak CUDA memory one call allocates beyond what was live before it (inputs excluded)."""
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


def time_ms(fn: Callable[[], object], grad_to_none: list, timing: dict) -> list[float]:
    """[median, p20, p80] in ms from triton.testing.do_bench (L2 flushed before each run)."""
    import triton.testing

    return triton.testing.do_bench(
        fn, grad_to_none=grad_to_none or None, quantiles=QUANTILES, **timing
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bench_shape_dtype(
    shape: tuple[int, int], dtype: torch.dtype, timing: dict, meta: dict
) -> tuple[list[dict], list[str], list[str]]:
    """All rows for one input: the copy baseline, then every qconfig x bench x provider."""
    import triton_qat as tq

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)
    dy = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)
    tensor_bytes = x.numel() * x.element_size()
    records: list[dict] = []
    problems: list[str] = []
    notes: list[str] = []

    def record(bench: str, qconfig, provider: str, nbytes: int, fn, grads, copy_gbps) -> dict:
        rec = {
            "bench": bench,
            "shape": list(shape),
            "dtype": dtype_name(dtype),
            "qconfig": qconfig,
            "provider": provider,
            "ms": None,
            "gbps": None,
            "pct_copy_bw": None,
            "peak_mem_mb": None,
            **meta,
        }
        try:
            ms, p20, p80 = time_ms(fn, grads, timing)
            peak = peak_extra_mb(fn, grads)
        except Exception as err:  # a provider that refuses this dtype/layout is a row, not a crash
            rec["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            line = f"{bench} {qconfig} {provider} {shape} {dtype_name(dtype)}: {rec['error']}"
            # torch refusing a dtype is a fact about torch; our own rows failing is a failure.
            if provider == TORCH:
                notes.append("NOTE " + line)
            else:
                problems.append("FAILED " + line)
            return rec
        gbps = nbytes / (ms * 1e-3) / 1e9
        rec.update(
            ms=ms,
            gbps=gbps,
            pct_copy_bw=100.0 * gbps / copy_gbps if copy_gbps else None,
            peak_mem_mb=peak,
            ms_p20=p20,
            ms_p80=p80,
        )
        return rec

    y = torch.empty_like(x)
    copy_rec = record(
        COPY_BENCH, None, COPY, 2 * tensor_bytes, functools.partial(y.copy_, x), [], None
    )
    copy_gbps = copy_rec["gbps"]
    if copy_gbps is not None:
        copy_rec["pct_copy_bw"] = 100.0  # by definition; avoids 99.99999 from rounding
    records.append(copy_rec)
    del y

    for qconfig in QCONFIGS:
        case = make_case(qconfig, x, gen)
        try:
            problems += verify(case, x, dy)
        except Exception as err:  # a kernel that fails to compile or run: its rows fail below
            msg = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            problems.append(f"FAILED verify {qconfig} {shape} {dtype_name(dtype)}: {msg}")
        torch.cuda.empty_cache()
        # Ideal traffic: x read once, y written once, the params; backward adds dy and dx.
        fwd_bytes = 2 * tensor_bytes + case.param_bytes
        fwd_bwd_bytes = 4 * tensor_bytes + case.param_bytes
        for bench, nbytes in ((FWD, fwd_bytes), (FWD_BWD, fwd_bwd_bytes)):
            by_provider = {}
            for provider, op in ((TQ, case.tq_op), (TORCH, case.torch_op)):
                fn, grads = forward_fn(op, x) if bench == FWD else forward_backward_fn(op, x, dy)
                with tq.use_backend("triton"):
                    rec = record(bench, qconfig, provider, nbytes, fn, grads, copy_gbps)
                by_provider[provider] = rec
                records.append(rec)
                del fn, grads
            tq_ms, torch_ms = by_provider[TQ]["ms"], by_provider[TORCH]["ms"]
            by_provider[TQ]["torch_over_tq"] = torch_ms / tq_ms if tq_ms and torch_ms else None
        del case
        torch.cuda.empty_cache()
    del x, dy
    torch.cuda.empty_cache()
    return records, problems, notes


def finite(record: dict) -> dict:
    """NaN or inf would make the JSON invalid for strict readers: write null instead."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def format_table(records: list[dict]) -> str:
    head = (
        f"{'bench':<19} {'qconfig':<23} {'shape':<12} {'dtype':<9} {'provider':<11} "
        f"{'ms':>8} {'GB/s':>8} {'%copy':>6} {'torch/tq':>8} {'peakMB':>8}"
    )
    lines = [head, "-" * len(head)]

    def num(v, fmt: str) -> str:
        width = int(fmt.split(".")[0])
        return "-".rjust(width) if v is None else format(v, fmt)

    for r in records:
        shape = "x".join(str(s) for s in r["shape"])
        lines.append(
            f"{r['bench']:<19} {r['qconfig'] or '-':<23} {shape:<12} {r['dtype']:<9} "
            f"{r['provider']:<11} {num(r['ms'], '8.4f')} {num(r['gbps'], '8.1f')} "
            f"{num(r['pct_copy_bw'], '6.1f')} {num(r.get('torch_over_tq'), '8.2f')} "
            f"{num(r['peak_mem_mb'], '8.1f')}" + (f"  ERROR {r['error']}" if r.get("error") else "")
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/latest"),
        help="folder for fake_quant.json (created if missing)",
    )
    p.add_argument(
        "--quick", action="store_true", help="4096x4096 only, shorter timing (a smoke run)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = gpu_run_metadata("bench_fake_quant")
    if meta is None:
        return EXIT_NO_CUDA
    gpu = meta["gpu"]
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print(f"bench_fake_quant: {gpu}, torch {meta['torch']}, triton {meta['triton']}", flush=True)

    records: list[dict] = []
    problems: list[str] = []
    for shape in shapes:
        for dtype in DTYPES:
            print(f"  {shape[0]}x{shape[1]} {dtype_name(dtype)} ...", flush=True)
            try:
                recs, probs, notes = bench_shape_dtype(shape, dtype, timing, meta)
            except Exception as err:  # e.g. out of memory: keep the rows of the other inputs
                msg = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                recs, probs, notes = [], [f"FAILED {shape} {dtype_name(dtype)}: {msg}"], []
                torch.cuda.empty_cache()
            records += recs
            problems += probs
            for line in probs + notes:
                print(f"    {line}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fake_quant.json"
    path.write_text(json.dumps([finite(r) for r in records], indent=1) + "\n")
    print(format_table(records))
    print(f"wrote {len(records)} records to {path}")
    print(f"commit figures under bench/results/{card_slug(gpu)}/ (see bench/README.md)")
    if problems:
        print(f"bench_fake_quant: {len(problems)} problem(s):", *problems, sep="\n  ")
        return EXIT_MISMATCH
    return 0


if __name__ == "__main__":
    sys.exit(main())
