"""Command line: ``python -m triton_qat {env,check,autotune}``.

    python -m triton_qat env [--json]
        versions, platform, CUDA devices, the backend in force, whether kernels are
        interpreted, torch's CPU capability, Triton's cache dir, triton_qat's autotune cache
        file and its number of entries.
    python -m triton_qat check [--quick] [--device cpu|cuda] [--json PATH]
        every kernel against the eager reference and the reference against torch (see
        triton_qat.tools.check); a table, exit 1 on any failure.
    python -m triton_qat autotune [--shapes MxNxK ... | --model MODULE:FACTORY]
                                  [--batch-tokens M] [--dtype bf16|fp16|fp32]
                                  [--granularity per_channel|per_tensor|per_group]
                                  [--group-size 128] [--no-cache]
        run the fused linear's autotuner on a CUDA GPU, store the winners in the autotune
        cache (triton_qat.kernels.autotune_cache) and time each against F.linear.

Exit status: 0 success, 1 a failed check, 2 a setup problem (no CUDA, the interpreter in the
wrong state, triton missing), reported on one stderr line. Only `env`, `check --device cuda`
and `autotune` query CUDA.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import triton_qat
from triton_qat.numerics.qparams import QParams
from triton_qat.ops import functional as ops
from triton_qat.ops.backend import get_backend, triton_unavailable_reason
from triton_qat.tools import check, tuning

EXIT_OK, EXIT_FAILED, EXIT_SETUP = 0, 1, 2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _fail_setup(command: str, reason: str) -> int:
    print(f"triton_qat {command}: {reason}", file=sys.stderr)
    return EXIT_SETUP


def _interpret_env() -> str | None:
    return os.environ.get("TRITON_INTERPRET")


def _interpret_requested() -> bool:
    return (_interpret_env() or "0").strip().lower() in ("1", "true", "on", "yes")


# --- env -------------------------------------------------------------------------------------


def _triton_info() -> tuple[str, str | None, bool | None]:
    """(version or "not installed", Triton's cache dir, whether Triton interprets kernels)."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    try:
        from triton import knobs

        return version, str(knobs.cache.dir), bool(knobs.runtime.interpret)
    except Exception:  # triton missing, broken, or too old for knobs
        cache = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
        return version, cache, None


def environment() -> dict:
    """What `env` reports, as a dict."""
    triton_version, triton_cache, interpreted = _triton_info()
    # Imported on use: the kernels package imports Triton, which `check --device cpu` must
    # find not yet imported (it sets TRITON_INTERPRET first).
    from triton_qat.kernels.autotune_cache import AutotuneCache, autotune_cache_dir

    cache = AutotuneCache()
    if interpreted is None:
        interpreted = _interpret_requested()
    cuda = torch.cuda.is_available()
    devices = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            devices.append(
                {"name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"}
            )
    return {
        "triton_qat": triton_qat.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_devices": devices,
        "backend": get_backend(),
        "TRITON_QAT_BACKEND": os.environ.get("TRITON_QAT_BACKEND"),
        "kernels_interpreted": interpreted,
        "TRITON_INTERPRET": _interpret_env(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "triton_cache_dir": triton_cache,
        "autotune_cache_dir": str(autotune_cache_dir()),
        "autotune_cache_file": str(cache.path),
        "autotune_cache_entries": len(cache),
    }


def _cmd_env(args: argparse.Namespace) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    devices = ", ".join(f"{d['name']} (sm {d['capability']})" for d in info["cuda_devices"])
    lines = [
        ("triton_qat", info["triton_qat"]),
        ("torch", f"{info['torch']} (CUDA build {info['torch_cuda_build']})"),
        ("triton", info["triton"]),
        ("python", info["python"]),
        ("platform", info["platform"]),
        ("cuda", f"available: {devices}" if info["cuda_available"] else "not available"),
        ("backend", f"{info['backend']} (TRITON_QAT_BACKEND={info['TRITON_QAT_BACKEND']})"),
        (
            "interpreted",
            f"{'yes' if info['kernels_interpreted'] else 'no'} "
            f"(TRITON_INTERPRET={info['TRITON_INTERPRET']})",
        ),
        ("cpu capability", info["cpu_capability"]),
        ("triton cache", info["triton_cache_dir"]),
        (
            "autotune cache",
            f"{info['autotune_cache_file']} ({info['autotune_cache_entries']} entries "
            f"for triton {info['triton']})",
        ),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    return EXIT_OK


# --- check -----------------------------------------------------------------------------------


def _default_device() -> str:
    if _interpret_requested() or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def _cmd_check(args: argparse.Namespace) -> int:
    device = args.device or _default_device()
    reason = check.prepare_device(device)
    if reason is not None:
        return _fail_setup("check", reason)
    mode = "quick" if args.quick else "full"
    print(f"triton_qat check ({mode} grid) on {device}", flush=True)
    print(check.table_header(), flush=True)
    start = time.monotonic()
    results = check.run_check(
        args.quick, device, on_result=lambda row: print(check.format_row(row), flush=True)
    )
    elapsed = time.monotonic() - start
    failed = [r for r in results if not r.passed]
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [r.to_json() for r in results]
        path.write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")
    verdict = "all passed" if not failed else f"{len(failed)} FAILED"
    print(f"{len(results)} rows, {verdict}, in {elapsed:.1f} s")
    if failed:
        print("failures:")
        for row in failed:
            print("  " + check.format_row(row))
    return check.exit_code(results)


# --- autotune --------------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    try:
        m, n, k = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be MxNxK (e.g. 8192x4096x4096): {text!r}"
        ) from None
    if min(m, n, k) <= 0:
        raise argparse.ArgumentTypeError(f"shape extents must be positive: {text!r}")
    return m, n, k


def _autotune_weight_qparams(w: torch.Tensor, granularity: str, group_size: int):
    """Weight qparams as a QAT observer would choose them (min / max of the weight)."""
    wf = w.float()
    if granularity == "per_tensor":
        return QParams(max(wf.abs().max().item(), 1e-8) / 127, 0, -128, 127)
    if granularity == "per_channel":
        scale = (wf.abs().amax(dim=1) / 127).clamp_min(1e-8)
        zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return QParams(scale, zp, -128, 127, axis=0)
    groups = wf.reshape(w.shape[0], -1, group_size)
    lo, hi = groups.amin(dim=-1).clamp_max(0), groups.amax(dim=-1).clamp_min(0)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zp = (-lo / scale).round().clamp(0, 15).to(torch.int32)
    return QParams(scale, zp, 0, 15, group_size=group_size)


def _config_text(config) -> tuple[str, int, int]:
    kw = config.kwargs
    return f"{kw['BLOCK_M']}/{kw['BLOCK_N']}/{kw['BLOCK_K']}", config.num_warps, config.num_stages


def _tuning_source(tuner, before: tuple[int, int]) -> str:
    """How the call that just ran got its config: "tuned" (benchmarked), "cache" (the file),
    or "memory" (tuned earlier in this process, or one config left after pruning)."""
    hits, tuned = getattr(tuner.cache, "hits", ()), getattr(tuner.cache, "tuned", ())
    if len(tuned) > before[1]:
        return "tuned"
    if len(hits) > before[0]:
        return "cache"
    return "memory"


_TABLE_HEADER = (
    f"{'shape MxNxK':<18} {'dtype':<5} {'weights':<16} {'kernel':<7} {'BLOCK_M/N/K':<12} "
    f"{'warps':>5} {'stages':>6} {'source':<6} {'ms':>8} {'TFLOP/s':>8} {'torch ms':>9} "
    f"{'x torch':>8}"
)


def _autotune_shape(job, dtype_name: str) -> list[str]:
    """Tune (or look up) the forward, dX and dW GEMMs of one LinearShape as the op runs them
    (on the operands' int8 codes where it reads those), time each against the plain GEMM of
    the same shape, and return the table rows."""
    import torch.nn.functional as F
    import triton.testing

    from triton_qat.kernels import fq_matmul, int_matmul  # Triton: imported on use

    m, n, k = job.m, job.n, job.k
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((m, k), generator=gen, device="cuda").to(job.dtype)
    w = torch.randn((n, k), generator=gen, device="cuda").to(job.dtype)
    b = torch.randn((n,), generator=gen, device="cuda").to(job.dtype)
    dy = torch.randn((m, n), generator=gen, device="cuda").to(job.dtype)
    wqp = _autotune_weight_qparams(w, job.granularity, job.group_size or 0)
    xqp = None
    if job.input_fq:
        xqp = QParams(max(x.float().abs().max().item(), 1e-8) / 127, 0, -128, 127)
    lq = ops.linear_quant(x, w, wqp, xqp)
    # As the op runs them (codes passes included), so the tuned keys are the ones training uses.
    runs = {
        "forward": (
            fq_matmul.fq_linear_fwd_kernel,
            lambda: int_matmul.fused_forward(x, w, b, lq),
            lambda: F.linear(x, w, b),
        ),
        "dX": (
            fq_matmul.fq_linear_dx_kernel,
            lambda: int_matmul.fused_grad_input(dy, x, w, lq),
            lambda: dy @ w,
        ),
        "dW": (
            fq_matmul.fq_linear_dw_kernel,
            lambda: int_matmul.fused_grad_weight(dy, x, w, lq),
            lambda: dy.t() @ x,
        ),
    }
    shape = f"{m}x{n}x{k}"
    flops = 2.0 * m * n * k
    rows = []
    for name, (tuner, kernel_fn, torch_fn) in runs.items():
        before = (len(getattr(tuner.cache, "hits", ())), len(getattr(tuner.cache, "tuned", ())))
        start = time.monotonic()
        kernel_fn()  # the first launch of this key tunes, or finds the cached winner
        torch.cuda.synchronize()
        first_s = time.monotonic() - start
        source = _tuning_source(tuner, before)
        print(
            f"autotune {shape} {dtype_name} {job.weights} {name}: {source} in {first_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        blocks, warps, stages = _config_text(tuner.best_config)
        ms = triton.testing.do_bench(kernel_fn, quantiles=[0.5, 0.2, 0.8])[0]
        torch_ms = triton.testing.do_bench(torch_fn, quantiles=[0.5, 0.2, 0.8])[0]
        rows.append(
            f"{shape:<18} {dtype_name:<5} {job.weights:<16} {name:<7} {blocks:<12} {warps:>5} "
            f"{stages:>6} {source:<6} {ms:>8.3f} {flops / ms / 1e9:>8.1f} {torch_ms:>9.3f} "
            f"{ms / torch_ms:>8.2f}"
        )
    return rows


def autotune_jobs(args: argparse.Namespace) -> list:
    """The LinearShapes `autotune` tunes: collected from --model, else --shapes with --dtype,
    --granularity and --group-size."""
    if args.model:
        model, sample = tuning.load_model(args.model)
        return tuning.collect_linear_shapes(model, sample, batch_tokens=args.batch_tokens)
    group = args.group_size if args.granularity == "per_group" else None
    return [
        tuning.LinearShape(m, n, k, args.granularity, DTYPES[args.dtype], group_size=group)
        for m, n, k in args.shapes
    ]


def _cmd_autotune(args: argparse.Namespace) -> int:
    """Autotune the fused linear's forward, dX and dW GEMMs for each shape, and time them.

    Shapes come from --shapes (with --dtype, --granularity, --group-size), or from a model:
    --model module:factory calls factory(), which returns (model, sample batch), runs the
    batch through it and records each triton_qat.nn.Linear's (M, N, K), weight granularity
    and dtype (--batch-tokens sets M). Each kernel's first launch benchmarks its autotune
    space, or takes the winner from triton_qat's cache file (see `python -m triton_qat env`);
    one line per kernel on stderr says which. The winners are then timed with
    triton.testing.do_bench against the plain GEMM of the same shape in torch (F.linear for
    the forward, and F.linear's own backward GEMMs dy @ w and dy^T @ x for dX and dW: columns
    "torch ms" and "x torch"), and new winners are stored in the cache. --no-cache neither
    reads nor writes it (TRITON_QAT_AUTOTUNE_CACHE=0 does the same).
    """
    if _interpret_requested():
        return _fail_setup(
            "autotune", "TRITON_INTERPRET is set; autotuning needs compiled kernels on a CUDA GPU"
        )
    if not torch.cuda.is_available():
        return _fail_setup(
            "autotune",
            f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "autotuning needs an NVIDIA GPU",
        )
    reason = triton_unavailable_reason(torch.device("cuda"))
    if reason is not None:
        return _fail_setup("autotune", reason)
    # Imported on use: the kernels import Triton, which `env` and `check --device cpu` may lack.
    from triton_qat.kernels import INTERPRETED_KERNELS

    if INTERPRETED_KERNELS:
        return _fail_setup("autotune", "triton_qat's kernels were loaded interpreted")
    if args.no_cache:
        os.environ["TRITON_QAT_AUTOTUNE_CACHE"] = "0"
    try:
        jobs = autotune_jobs(args)
    except (ValueError, TypeError) as e:
        return _fail_setup("autotune", str(e))
    bad = [(j.m, j.n, j.k) for j in jobs if j.group_size and j.k % j.group_size]
    if bad:
        return _fail_setup("autotune", f"--group-size {args.group_size} does not divide K of {bad}")

    from triton_qat.kernels import fq_matmul  # Triton: imported on use

    names = {v: k for k, v in DTYPES.items()}
    from triton_qat.kernels.autotune_cache import cache_enabled, default_cache  # Triton: on use

    cache = default_cache() if cache_enabled() else None
    where = f"cache {cache.path}" if cache is not None else "no cache"
    print(
        f"triton_qat autotune on {torch.cuda.get_device_name()}: {len(jobs)} shape(s), {where}",
        file=sys.stderr,
        flush=True,
    )
    rows = []
    for job in jobs:
        dtype_name = names.get(job.dtype, str(job.dtype).removeprefix("torch."))
        rows += _autotune_shape(job, dtype_name)
    if any(job.dtype == torch.float32 for job in jobs):
        print(f"fp32 dot precision {fq_matmul.input_precision(torch.float32)}")
    print(_TABLE_HEADER)
    for row in rows:
        print(row)
    if cache is not None:
        print(f"{len(cache)} entries in {cache.path}")
    return EXIT_OK


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m triton_qat", description="triton_qat: checks, autotuning, environment"
    )
    sub = parser.add_subparsers(dest="command", metavar="{env,check,autotune}")

    env = sub.add_parser("env", help="versions, devices, backend, cache paths")
    env.add_argument("--json", action="store_true", help="print JSON instead of text")
    env.set_defaults(func=_cmd_env)

    chk = sub.add_parser(
        "check", help="compare every kernel with the eager reference, and it with torch"
    )
    chk.add_argument("--quick", action="store_true", help="tiny shapes (seconds, not minutes)")
    chk.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="cpu: kernels under the Triton interpreter; cuda: compiled "
        "(default: cuda when available and TRITON_INTERPRET is unset)",
    )
    chk.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    chk.set_defaults(func=_cmd_check)

    tune = sub.add_parser(
        "autotune",
        help="autotune the fused linear's GEMMs on a CUDA GPU and time the chosen configs",
        description=_cmd_autotune.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = tune.add_mutually_exclusive_group()
    source.add_argument(
        "--shapes",
        nargs="+",
        type=_shape,
        default=[(8192, 4096, 4096), (1024, 4096, 4096)],
        metavar="MxNxK",
        help="x (M, K) times weight (N, K)^T (default: 8192x4096x4096 1024x4096x4096)",
    )
    source.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="tune the shapes of this model's tq.nn.Linear layers; factory() returns "
        "(model, sample batch)",
    )
    tune.add_argument(
        "--batch-tokens", type=int, default=None, help="with --model: M of every GEMM"
    )
    tune.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    tune.add_argument(
        "--granularity",
        choices=("per_channel", "per_tensor", "per_group"),
        default="per_channel",
        help="weight fake quant: int8 per channel / per tensor, int4 per group",
    )
    tune.add_argument("--group-size", type=int, default=128, help="for per_group (default 128)")
    tune.add_argument(
        "--no-cache", action="store_true", help="neither read nor write the autotune cache"
    )
    tune.set_defaults(func=_cmd_autotune)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_SETUP
    if getattr(args, "group_size", 1) <= 0:
        parser.error("--group-size must be positive")
    if getattr(args, "batch_tokens", None) is not None:
        if args.batch_tokens <= 0:
            parser.error("--batch-tokens must be positive")
        if not args.model:
            parser.error("--batch-tokens goes with --model (--shapes give M themselves)")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
