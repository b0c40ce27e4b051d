"""Run the benchmark suite into bench/results/<card>/ and render the report.

    PYTHONPATH=. python bench/run_all.py [--results bench/results] [--quick] [--budget-s S]

bench_fake_quant.py writes RESULTS/<card>/fake_quant.json, then bench_linear.py (with
--budget-s) writes RESULTS/<card>/linear.json; <card> is the GPU's name as a folder name
(bench/README.md). report.py then renders everything below RESULTS: RESULTS/README.md and
RESULTS/<card>/linear.png. Exit status: the worst of the two benchmarks' (0, 1), or 2 with one
line on stderr when there is no CUDA device or TRITON_INTERPRET is set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _gpu_run import EXIT_NO_CUDA, card_slug, gpu_run_metadata


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--quick", action="store_true", help="each benchmark's smoke run")
    p.add_argument(
        "--budget-s", type=float, default=150.0, help="bench_linear's --budget-s (default 150)"
    )
    args = p.parse_args(argv)
    meta = gpu_run_metadata("run_all")
    if meta is None:
        return EXIT_NO_CUDA

    import bench_fake_quant
    import bench_linear
    import report

    out = args.results / card_slug(meta["gpu"])
    quick = ["--quick"] if args.quick else []
    codes = [
        bench_fake_quant.main(["--out", str(out), *quick]),
        bench_linear.main(["--out", str(out), "--budget-s", str(args.budget_s), *quick]),
    ]
    report.render(args.results)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
