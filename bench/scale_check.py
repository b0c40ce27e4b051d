"""Tensors past 2**31 elements: the standalone fake quant and a large-M fused linear.

    python bench/scale_check.py [--fq-shape 65539 32769] [--linear 524301 256 4096]

Both runs use the Triton kernels (backend "triton") in bfloat16, forward and backward. An
int32 offset would wrap past element 2**31 and corrupt the rows stored there, so the rows at
the start, around element 2**31 and at the end of the big run are compared with the same
rows run alone (a small tensor, far from any overflow), bit for bit: fake quant against the
eager reference, the fused linear against the same kernels on the slice (with one GEMM config,
TRITON_QAT_AUTOTUNE=0, set here, so both runs sum in the same order). The weight gradient,
a sum over all M rows, is compared with an fp32 sum of per-chunk eager products (relative
error norm within 2**-7: bf16 output rounding, 2**-9, plus fp32 accumulation order).

Default sizes need a GPU with about 30 GiB free; tests run it on the CPU at toy sizes.
Prints one line per check; exit 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REL_TOL_DW = 2.0**-7


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fq-shape", type=int, nargs=2, default=[65539, 32769], metavar=("R", "C"))
    p.add_argument("--linear", type=int, nargs=3, default=[524301, 256, 4096], metavar="MNK")
    p.add_argument("--rows", type=int, default=64, help="rows compared at each place")
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def _places(total_rows: int, row_elems: int, rows: int) -> list[int]:
    """First row of each compared block: the start, the row holding element 2**31, the end."""
    at_2_31 = min(2**31 // max(row_elems, 1), total_rows - 1)
    starts = {0, max(0, at_2_31 - rows // 2), max(0, total_rows - rows)}
    return sorted(starts)


def _bitwise(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def check_fake_quant(rows_cols, rows: int, device) -> list[tuple[str, bool, str]]:
    import torch

    import triton_qat as tq

    r, c = rows_cols
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(r, c, generator=g, device=device, dtype=torch.bfloat16)
    x.requires_grad_()
    scale = torch.rand(r, generator=g, device=device) * 0.02 + 0.005
    zp = torch.randint(-8, 8, (r,), generator=g, device=device, dtype=torch.int32)
    with tq.use_backend("triton"):
        y = tq.fake_quantize_per_channel(x, scale, zp, 0, -128, 127)
        y.backward(y.detach())  # dy = y: nonzero where kept, so the mask shows
    out = []
    for start in _places(r, c, rows):
        sl = slice(start, start + rows)
        xs = x.detach()[sl].clone().requires_grad_()
        with tq.use_backend("eager"):
            ys = tq.fake_quantize_per_channel(xs, scale[sl], zp[sl], 0, -128, 127)
            ys.backward(ys.detach())
        ok = _bitwise(y.detach()[sl], ys.detach()) and _bitwise(x.grad[sl], xs.grad)
        first = start * c
        out.append((f"fake quant per channel, rows {start}.. (elements {first:,}..)", ok, ""))
    return out


def check_linear(mnk, rows: int, device) -> list[tuple[str, bool, str]]:
    import torch

    import triton_qat as tq

    m, n, k = mnk
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(m, k, generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(n, k, generator=g, device=device) * 0.05).to(torch.bfloat16)
    w.requires_grad_()
    dy = torch.randn(m, n, generator=g, device=device, dtype=torch.bfloat16)
    qp = tq.QParams(
        torch.full((n,), 0.001, device=device),
        torch.zeros(n, dtype=torch.int32, device=device),
        -128,
        127,
        axis=0,
    )
    with tq.use_backend("triton"):
        y = tq.fq_linear(x, w, weight_qparams=qp)
        y.backward(dy)
    out = []
    for start in _places(m, k, rows):
        sl = slice(start, start + rows)
        xs = x.detach()[sl].clone().requires_grad_()
        with tq.use_backend("triton"):
            ys = tq.fq_linear(xs, w.detach(), weight_qparams=qp)
            ys.backward(dy[sl])
        ok = _bitwise(y.detach()[sl], ys.detach()) and _bitwise(x.grad[sl], xs.grad)
        out.append((f"fused linear y and dX, rows {start}.. (x elements {start * k:,}..)", ok, ""))
    # dW: an fp32 sum of per-chunk products dy_c^T @ x_c (x has no input fq), times the
    # weight's straight-through mask (from the eager reference).
    with tq.use_backend("eager"):
        wm = w.detach().clone().requires_grad_()
        tq.fq_linear(torch.ones_like(x[:1]), wm, weight_qparams=qp).sum().backward()
        mask = wm.grad != 0
        want = torch.zeros(n, k, device=device, dtype=torch.float32)
        chunk = max(1, 2**26 // k)
        for s in range(0, m, chunk):
            want += dy[s : s + chunk].float().t() @ x.detach()[s : s + chunk].float()
        want *= mask
    err = float((w.grad.float() - want).norm() / want.norm().clamp_min(1e-30))
    out.append((f"fused linear dW over M={m:,} rows", err <= REL_TOL_DW, f"rel err {err:.2e}"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["TRITON_QAT_AUTOTUNE"] = "0"  # one GEMM config: slices sum as the big run
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton_qat") is None:
        sys.path.insert(0, str(ROOT))
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("scale_check: no CUDA device; this check needs an NVIDIA GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    results = []
    for name, fn, shape in (
        ("fake quant", check_fake_quant, args.fq_shape),
        ("fused linear", check_linear, args.linear),
    ):
        numel = shape[0] * shape[-1]
        t0 = time.perf_counter()
        got = fn(shape, args.rows, device)
        print(
            f"{name}: {numel:,} elements ({numel / 2**31:.2f} x 2**31), "
            f"{time.perf_counter() - t0:.1f} s"
        )
        results += got
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for what, ok, note in results:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}{'  ' + note if note else ''}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
