"""Fake-quantize a Linear layer's weight through both backends and compare them.

Runs anywhere: on a CUDA GPU the Triton kernels are compiled; on a CPU they run under the
Triton interpreter (TRITON_INTERPRET=1 is set here when no GPU is present).

    python examples/fake_quant_weight.py [--out-features 256] [--in-features 512]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first kernel launch

import triton_qat as tq


def symmetric_per_channel(w: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.detach().abs().amax(dim=1).float().clamp_min(1e-8)
    return amax / qmax, torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)


def asymmetric_per_group(w, group, qmax):
    g = w.detach().float().reshape(w.shape[0], -1, group)
    lo = g.amin(-1).clamp_max(0)
    hi = g.amax(-1).clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zp = (-lo / scale).round().clamp(0, qmax).to(torch.int32)
    return scale, zp


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-features", type=int, default=256)
    p.add_argument("--in-features", type=int, default=512)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    w = torch.nn.Linear(args.in_features, args.out_features).weight.detach().to(device, dtype)
    s_ch, z_ch = symmetric_per_channel(w, 127)
    s_g, z_g = asymmetric_per_group(w, 32, 15)
    s_t = float(w.abs().max()) / 127
    cases = {
        "int8 per tensor": lambda: tq.fake_quantize_per_tensor(w, s_t, 0, -128, 127),
        "int8 per channel": lambda: tq.fake_quantize_per_channel(w, s_ch, z_ch, 0, -128, 127),
        "uint4 per group 32": lambda: tq.fake_quantize_per_group(w, s_g, z_g, 32, 0, 15),
    }
    torch_ops = {
        "int8 per tensor": lambda: torch.fake_quantize_per_tensor_affine(w, s_t, 0, -128, 127),
        "int8 per channel": lambda: torch.fake_quantize_per_channel_affine(
            w.cpu(), s_ch.cpu(), z_ch.cpu(), 0, -128, 127
        ),
    }
    print(
        f"weight {tuple(w.shape)} {args.dtype} on {device}; kernels "
        f"{'compiled' if device.type == 'cuda' else 'interpreted (TRITON_INTERPRET=1)'}"
    )
    header = f"{'quantizer':<20} {'eager ms':>9} {'triton ms':>10} {'bit-exact':>10} "
    print(header + f"{'vs torch':>9} {'SQNR dB':>8}")
    all_exact = True
    for name, fn in cases.items():
        results = {}
        for backend in ("eager", "triton"):
            with tq.use_backend(backend):
                fn()  # warm-up (compiles or traces the kernel)
                t0 = time.perf_counter()
                y = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                results[backend] = (y, (time.perf_counter() - t0) * 1e3)
        (ye, te), (yt, tt) = results["eager"], results["triton"]
        exact = torch.equal(ye, yt)
        all_exact &= exact
        vs_torch = "-"
        if name in torch_ops:
            same = torch.equal(torch_ops[name]().cpu(), ye.cpu())
            all_exact &= same
            vs_torch = "equal" if same else "DIFFERS"
        print(
            f"{name:<20} {te:>9.2f} {tt:>10.2f} {('yes' if exact else 'NO'):>10} "
            f"{vs_torch:>9} {sqnr_db(w, ye):>8.1f}"
        )
    print("all paths agree bit for bit" if all_exact else "MISMATCH between paths")
    raise SystemExit(0 if all_exact else 1)


if __name__ == "__main__":
    main()
