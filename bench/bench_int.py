"""Benchmark the integer GEMMs of triton_qat.kernels.int_matmul against bf16 F.linear on CUDA.

    PYTHONPATH=. python bench/bench_int.py --out bench/results/latest [--quick] [--budget-s S]

One shape, x (M, K) @ w (N, K)^T with M = 8192, N = K = 4096, bfloat16 activations, forward
only (inference, no autograd). Providers, in plan order:
  torch_linear          F.linear(x, w, b) in bf16, the floor every ratio is taken against
  weight_only_int8      bf16 x times int8 per-channel codes (a converted int8_per_channel layer)
  w8a8                  per-token int8 quantization of x, then the int8 GEMM with int32 sums
                        (a converted w8a8_dynamic layer)
  w8a8_gemm             the int8 GEMM alone, on codes quantized beforehand
  w4a8_group32          per-token affine int8 x times int4 codes per group of 32, two per byte
                        (a converted w4a8_dynamic layer)
  w8a8_qat_fwd          w8a8_linear from the bf16 weight: weight and input quantized every call
                        (the forward the QAT layer would run)
  weight_only_int4_g32  bf16 x times packed int4 codes per group of 32 (int4_per_group)
The first call of each provider, which compiles and autotunes its kernels, is timed on its own
(first_call_s). Before timing, each output is compared with the float32 composition
F.linear(fq(x), dequantized w) of triton_qat's eager path (relative error norm <= 2**-8).

Writes OUT/int_linear.json (a list of records, rewritten after every provider) and prints a
table. --budget-s: no new provider starts once fewer than MIN_ROW_S seconds are left.
Exit status: 0 all rows timed and checked; 1 a failed row, a check over the limit or rows
skipped for time; 2 no CUDA (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _gpu_run import EXIT_NO_CUDA, gpu_run_metadata
from bench_linear import card_slug, one_line, rel_err, time_ms, write_json

SHAPE = (8192, 4096, 4096)  # (M, N, K)
DTYPE = torch.bfloat16
GROUP_SIZE = 32
BENCH = "int_linear_fwd"
REL_ERR_LIMIT = 2.0**-8
FULL_TIMING = {"warmup": 25, "rep": 100}
QUICK_TIMING = {"warmup": 10, "rep": 30}
DEFAULT_BUDGET_S = 120.0
MIN_ROW_S = 8.0  # autotuning one more GEMM kernel and timing it
EXIT_FAILED = 1


def _int_weight(w: torch.Tensor, group_size: int | None):
    """Symmetric int8 per output channel, or int4 (0..15, zero points) per group, of w."""
    from triton_qat.flow.convert import QuantizedLinear, quantize_codes
    from triton_qat.numerics.qparams import QParams

    n, k = w.shape
    wf = w.float()
    if group_size:
        groups = wf.view(n, k // group_size, group_size)
        lo = groups.amin(-1).clamp(max=0.0)
        hi = groups.amax(-1).clamp(min=0.0)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        zp = torch.round(-lo / scale).clamp(0, 15).to(torch.int32)
        qp = QParams(scale, zp, 0, 15, group_size=group_size)
    else:
        scale = (wf.abs().amax(1) / 127).clamp_min(1e-8)
        qp = QParams(scale, torch.zeros(n, dtype=torch.int32, device=w.device), -128, 127, axis=0)
    return QuantizedLinear(k, n, quantize_codes(w, qp), qp, None, weight_dtype=w.dtype), qp


def build(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> dict[str, tuple]:
    """provider -> (fn, reference fn): each Triton call and its eager float composition."""
    import triton_qat as tq
    from triton_qat.kernels import int_matmul as im
    from triton_qat.numerics.qparams import row_quant
    from triton_qat.quantizers import fake_quantize_per_token

    int8_layer, int8_qp = _int_weight(w, None)
    int4_layer, _ = _int_weight(w, GROUP_SIZE)
    wt8, wt4 = int8_layer.int_weight(), int4_layer.int_weight()
    w8 = int8_layer.dequantized_weight().to(DTYPE)
    w4 = int4_layer.dequantized_weight().to(DTYPE)
    sym = row_quant(-128, 127, torch.per_tensor_symmetric)
    aff = row_quant(-128, 127, torch.per_tensor_affine)
    xq_sym = im.quantize_rows(x, sym)

    def fq_rows(scheme):
        with tq.use_backend("eager"):
            return fake_quantize_per_token(x, -128, 127, scheme)

    def ref(xin, wdq):
        return lambda: F.linear(xin().float(), wdq.float(), b.float())

    return {
        "torch_linear": (lambda: F.linear(x, w, b), ref(lambda: x, w)),
        "weight_only_int8": (lambda: im.weight_only_linear(x, wt8, b), ref(lambda: x, w8)),
        "w8a8": (
            lambda: im.int8_linear(im.quantize_rows(x, sym), wt8, b, DTYPE),
            ref(lambda: fq_rows(torch.per_tensor_symmetric), w8),
        ),
        "w8a8_gemm": (
            lambda: im.int8_linear(xq_sym, wt8, b, DTYPE),
            ref(lambda: fq_rows(torch.per_tensor_symmetric), w8),
        ),
        "w4a8_group32": (
            lambda: im.int8_linear(im.quantize_rows(x, aff), wt4, b, DTYPE),
            ref(lambda: fq_rows(torch.per_tensor_affine), w4),
        ),
        "w8a8_qat_fwd": (
            lambda: im.w8a8_linear(x, w, b, weight_qparams=int8_qp, input_quant=sym),
            ref(lambda: fq_rows(torch.per_tensor_symmetric), w8),
        ),
        "weight_only_int4_g32": (lambda: im.weight_only_linear(x, wt4, b), ref(lambda: x, w4)),
    }


def run(args: argparse.Namespace, meta: dict) -> int:
    timing = QUICK_TIMING if args.quick else FULL_TIMING
    start = time.monotonic()
    m, n, k = SHAPE
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, generator=gen, device="cuda").to(DTYPE)
    w = (torch.randn(n, k, generator=gen, device="cuda") * k**-0.5).to(DTYPE)
    b = (torch.randn(n, generator=gen, device="cuda") * 0.1).to(DTYPE)
    providers = build(x, w, b)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "int_linear.json"
    records: list[dict] = []
    problems: list[str] = []
    floor_ms = None
    for name, (fn, ref) in providers.items():
        if name != "torch_linear" and time.monotonic() - start > args.budget_s - MIN_ROW_S:
            problems.append(f"SKIPPED {name}: out of time")
            continue
        rec = {"bench": BENCH, "shape": list(SHAPE), "dtype": "bfloat16", "provider": name, **meta}
        try:
            t0 = time.monotonic()
            y = fn()
            torch.cuda.synchronize()
            rec["first_call_s"] = round(time.monotonic() - t0, 3)
            err = rel_err(y, ref())
            rec["check_rel_err"] = err
            if err > REL_ERR_LIMIT:
                problems.append(f"CHECK {name}: relative error {err:.3g} > {REL_ERR_LIMIT:.3g}")
            del y
            ms, p20, p80 = time_ms(fn, [], timing)
            rec.update(ms=ms, ms_p20=p20, ms_p80=p80, tflops=2 * m * n * k / ms * 1e-9)
            if name == "torch_linear":
                floor_ms = ms
            if floor_ms:
                rec["vs_torch_linear"] = floor_ms / ms
        except Exception as err:  # e.g. a compile failure: keep the other rows
            rec["error"] = one_line(err)
            problems.append(f"FAILED {name}: {one_line(err)}")
        records.append(rec)
        write_json(path, records)
        print(format_row(rec), flush=True)
    print(f"wrote {len(records)} records to {path} in {time.monotonic() - start:.0f} s")
    if problems:
        print(f"bench_int: {len(problems)} problem(s):", *problems, sep="\n  ")
        return EXIT_FAILED
    return 0


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['provider']:<22} ERROR {r['error']}"
    ratio = r.get("vs_torch_linear")
    return (
        f"{r['provider']:<22} {r['ms']:8.3f} ms  {r['tflops']:7.1f} TFLOP/s  "
        f"x{ratio if ratio else float('nan'):5.2f} vs torch_linear  "
        f"first call {r['first_call_s']:6.1f} s  rel err {r['check_rel_err']:.2e}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/latest"))
    p.add_argument("--quick", action="store_true", help="shorter timing (a smoke run)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = gpu_run_metadata("bench_int")
    if meta is None:
        return EXIT_NO_CUDA
    print(f"bench_int: {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}", flush=True)
    rc = run(args, meta)
    print(f"commit figures under bench/results/{card_slug(meta['gpu'])}/ (see bench/README.md)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
