"""Eval time of the example's model on the CPU: float against tq.convert's integer model.

    python bench/bench_converted.py [--qconfig w4a8_dynamic int4_per_group ...] [--threads 2]

The model and batch are examples/qat_tiny_lm.py's defaults (3 blocks, d_model 128, context
64, batch 32, character vocabulary). Weights come from a prepared model whose observers saw
one batch (speed does not depend on training). Prints the median ms per batch of each, side
by side, with the converted model's largest difference from the fake-quantized (QAT, eval)
model it came from. The eager path: TRITON_INTERPRET is not set here.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("triton_qat") is None:  # run from a checkout, not installed
    sys.path.insert(0, str(ROOT))

import triton_qat as tq  # noqa: E402


def _load_example():
    spec = importlib.util.spec_from_file_location("qat_tiny_lm", ROOT / "examples/qat_tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["qat_tiny_lm"] = module
    spec.loader.exec_module(module)
    return module


def median_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--qconfig",
        nargs="+",
        default=["w4a8_dynamic", "w8a8_dynamic", "int4_per_group", "int8_per_channel"],
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ex = _load_example()
    vocab = len(ex.CharData.from_text(ex.load_corpus()).vocab)
    torch.manual_seed(0)
    float_model = ex.TinyLM(vocab, 128, 3, 4, 64).eval()
    x = torch.randint(vocab, (32, 64))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch {tuple(x.shape)}"
    )
    print("| qconfig | float ms/batch | converted ms/batch | converted / float | max diff vs QAT |")
    print("|---|---:|---:|---:|---:|")
    for name in args.qconfig:
        with tq.use_backend("eager"):
            qat = tq.prepare_qat(float_model, name)
            with torch.no_grad():
                qat(x)
            ex.disable_observers(qat)
            converted = tq.convert(qat).eval()
            with torch.no_grad():
                diff = (converted(x) - qat.eval()(x)).abs().max().item()
            # Interleaved, so that a load change on a shared machine hits both.
            f_ms, c_ms = [], []
            for _ in range(3):
                f_ms.append(median_ms(float_model, x, args.repeats))
                c_ms.append(median_ms(converted, x, args.repeats))
        f, c = sorted(f_ms)[1], sorted(c_ms)[1]
        print(f"| {name} | {f:.1f} | {c:.1f} | {c / f:.2f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
