"""Training stability: a long QAT run of the example model on the fused (Triton) path against
the same run on the eager path: same initial weights, same batches, same optimizer.

    python bench/stability.py [--steps 2000] [--device auto] [--out DIR]

The two runs differ only in floating-point rounding (summation order inside the GEMMs), so
their loss curves drift apart step by step but must stay statistically the same. The verdict:
over windows of W steps, the difference of the two runs' mean losses stays within 4 standard
errors of the batch-to-batch noise (the spread of each step's loss around its window mean,
pooled over both runs, times sqrt(2 / W)), for every window, and the final windows agree the
same way. Writes OUT/stability.json (both curves, the windows, the verdict) and, when
matplotlib is installed, OUT/stability.png. Exit 1 when the curves differ beyond the noise.

On a GPU the fused path is compiled; on a CPU it runs under the Triton interpreter (set here
before triton_qat is imported) with 128x128x64 GEMM tiles (TRITON_QAT_INTERPRETER_TILE; the
interpreter's cost is per program), which is still slow: use a small model, e.g.
--d-model 32 --layers 1 --heads 2 --seq-len 32 --batch-size 16 (1.3 to 2 s per fused step
on two cores; twice those sizes take about 8x longer).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="QAT steps of each run")
    p.add_argument("--pretrain-steps", type=int, default=200, help="float steps before QAT")
    p.add_argument("--window", type=int, default=0, help="steps per window (0: steps / 20)")
    p.add_argument("--qconfig", default="int4_per_group")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder (default bench/results/<device>)")
    args = p.parse_args(argv)
    if args.steps < 20:
        p.error("--steps must be at least 20 (the verdict compares windows of steps)")
    return args


def _load_example():
    spec = importlib.util.spec_from_file_location("qat_tiny_lm", ROOT / "examples/qat_tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def compare(eager: list[float], fused: list[float], window: int) -> dict:
    """Window-by-window comparison of two loss curves against the batch-to-batch noise."""
    n = min(len(eager), len(fused))
    rows = []
    for start in range(0, n - window + 1, window):
        a, b = eager[start : start + window], fused[start : start + window]
        mean_a, mean_b = sum(a) / window, sum(b) / window
        resid = [v - mean_a for v in a] + [v - mean_b for v in b]
        noise = math.sqrt(sum(r * r for r in resid) / max(1, len(resid) - 2))
        limit = 4.0 * noise * math.sqrt(2.0 / window)
        diff = mean_b - mean_a
        rows.append(
            {
                "steps": [start, start + window],
                "eager_mean": mean_a,
                "fused_mean": mean_b,
                "diff": diff,
                "limit": limit,
                "ok": abs(diff) <= limit,
            }
        )
    return {
        "window": window,
        "windows": rows,
        "ok": bool(rows) and all(r["ok"] for r in rows),
        "max_abs_step_diff": max(abs(x - y) for x, y in zip(eager[:n], fused[:n], strict=True)),
    }


def plot(path: Path, eager: list[float], fused: list[float], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("stability: matplotlib not installed; no plot (pip install matplotlib)")
        return False

    def ema(values: list[float], k: float = 0.02) -> list[float]:
        out, run = [], values[0]
        for v in values:
            run += k * (v - run)
            out.append(run)
        return out

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    steps = range(1, len(eager) + 1)
    top.plot(steps, eager, color="tab:blue", alpha=0.15, linewidth=0.5)
    top.plot(steps, fused, color="tab:orange", alpha=0.15, linewidth=0.5)
    top.plot(steps, ema(eager), color="tab:blue", label="eager (reference path)")
    top.plot(steps, ema(fused), color="tab:orange", label="fused (Triton kernels)")
    top.set_ylabel("train loss")
    top.set_title(title, fontsize=9)
    top.legend()
    bottom.plot(steps, [f - e for e, f in zip(ema(eager), ema(fused), strict=True)], color="k")
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.set_ylabel("fused - eager\n(smoothed)")
    bottom.set_xlabel("QAT step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_qat loads its kernels
        os.environ.setdefault("TRITON_QAT_INTERPRETER_TILE", "128x128x64")
    if importlib.util.find_spec("triton_qat") is None:
        sys.path.insert(0, str(ROOT))
    import triton

    import triton_qat as tq

    ex = _load_example()
    torch.manual_seed(args.seed)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    cfg = ex.RunConfig(
        device, autocast, args.batch_size, args.seq_len, log_every=max(1, args.steps // 10)
    )
    data = ex.CharData.from_text(ex.load_corpus())
    model = ex.TinyLM(len(data.vocab), args.d_model, args.layers, args.heads, args.seq_len)
    model.to(device)
    if args.pretrain_steps:
        print(f"float pretraining, {args.pretrain_steps} steps", flush=True)
        with tq.use_backend("eager"):
            ex.train(
                model, data, cfg, steps=args.pretrain_steps, lr=3e-3, seed=args.seed, label="float"
            )
    curves, step_ms = {}, {}
    for backend, label in (("eager", "eager"), ("triton", "fused")):
        print(f"QAT on the {label} path ({args.qconfig}), {args.steps} steps", flush=True)
        torch.manual_seed(args.seed + 1)
        qat = tq.prepare_qat(copy.deepcopy(model), args.qconfig)
        losses: list[float] = []
        with tq.use_backend(backend):
            step_ms[label] = ex.train(
                qat,
                data,
                cfg,
                steps=args.steps,
                lr=args.lr,
                seed=args.seed + 2,
                label=label,
                losses=losses,
            )
        curves[label] = losses
    window = args.window or max(10, args.steps // 20)
    verdict = compare(curves["eager"], curves["fused"], window)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else ROOT / "bench/results" / name.replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "bench": "stability",
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interpreted": device.type == "cpu",
        "interpreter_tile": (
            os.environ.get("TRITON_QAT_INTERPRETER_TILE") if device.type == "cpu" else None
        ),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "autocast": str(autocast) if autocast else None,
        "step_ms": step_ms,
        "verdict": verdict,
        "eager": curves["eager"],
        "fused": curves["fused"],
    }
    (out / "stability.json").write_text(json.dumps(record, indent=1) + "\n")
    title = (
        f"QAT {args.qconfig}, TinyLM d{args.d_model} x{args.layers}, {args.steps} steps, "
        f"{name}{' (interpreted)' if device.type == 'cpu' else ''}"
    )
    plot(out / "stability.png", curves["eager"], curves["fused"], title)
    bad = [w for w in verdict["windows"] if not w["ok"]]
    last = verdict["windows"][-1]
    print(
        f"stability: {len(verdict['windows'])} windows of {window} steps, {len(bad)} beyond "
        f"the noise; last window eager {last['eager_mean']:.4f} fused {last['fused_mean']:.4f} "
        f"(diff {last['diff']:+.4f}, limit {last['limit']:.4f}); max per-step difference "
        f"{verdict['max_abs_step_diff']:.4f}; {step_ms['eager']:.1f} / {step_ms['fused']:.1f} "
        f"ms per step; written to {out}",
        flush=True,
    )
    return 0 if verdict["ok"] else 1


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"stability: {time.perf_counter() - t0:.0f} s")
    sys.exit(rc)
