"""Eval time of the example's model on the CPU: float against tq.convert's integer model.

    python bench/bench_converted.py [--model tiny|llama] [--qconfig w4a8_dynamic ...] [--threads 2]

--model tiny: examples/qat_tiny_lm.py's defaults (3 blocks, d_model 128, context 64, batch 32,
character vocabulary). --model llama: examples/hf_llama_qat.py's LlamaForCausalLM (2 layers,
hidden 128, intermediate 320, batch 24 x 64 tokens; transformers needed); its qconfig
"recipe" is the example's per-module recipe (blocks w4a8_dynamic, embeddings 8-bit, lm_head
float). Weights come from a prepared model whose observers saw one batch (speed does not
depend on training). The two models run in alternating blocks of 5 forwards (--repeats
forwards each), so that a load change on a shared machine hits both; prints the median ms
per batch of each, the median of the per-block ratios, and the converted model's largest
difference from the fake-quantized (QAT, eval) model it came from. The eager path:
TRITON_INTERPRET is not set. On a shared machine single runs swing by +-0.2 with glibc's
page faults; MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 holds the
allocator steady and leaves the arithmetic (bench/README.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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


def _load_llama_example():
    sys.path.insert(0, str(ROOT / "examples"))
    import hf_llama_qat  # the example, importable from its folder

    return hf_llama_qat


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def paired_ms(
    a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, repeats: int, block: int = 5
) -> tuple[float, float, float]:
    """(median ms per forward of a, of b, median of the per-block ratios b / a): a and b run
    in alternating blocks of `block` forwards (each block cache-warm, as an eval loop is),
    the first of each pair of blocks alternating too."""
    ta, tb, ratios = [], [], []
    with torch.no_grad():
        a(x), b(x)
        for i in range(max(1, repeats // block)):
            pair = {}
            for model in (a, b) if i % 2 else (b, a):
                model(x)
                times = []
                for _ in range(block):
                    t0 = time.perf_counter()
                    model(x)
                    times.append((time.perf_counter() - t0) * 1e3)
                pair[id(model)] = _median(times)
            ta.append(pair[id(a)])
            tb.append(pair[id(b)])
            ratios.append(pair[id(b)] / pair[id(a)])
    return _median(ta), _median(tb), _median(ratios)


def _models(name: str):
    """(float model, its input batch, the qconfig / recipe of `name`, observers-off helper)."""
    ex = _load_example()
    vocab = len(ex.CharData.from_text(ex.load_corpus()).vocab)
    torch.manual_seed(0)
    if name == "tiny":
        return ex.TinyLM(vocab, 128, 3, 4, 64).eval(), torch.randint(vocab, (32, 64)), {}
    llama = _load_llama_example()
    args = llama.parse_args([])
    model = llama.Logits(llama.build_llama(vocab, args)).eval()
    x = torch.randint(vocab, (args.batch_size, args.seq_len))
    return model, x, {"recipe": {f"lm.{k}": v for k, v in llama.RECIPE.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--qconfig",
        nargs="+",
        default=["w4a8_dynamic", "w8a8_dynamic", "int4_per_group", "int8_per_channel"],
    )
    p.add_argument("--model", choices=("tiny", "llama"), default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=60)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ex = _load_example()
    float_model, x, named = _models(args.model)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {args.model}, "
        f"batch {tuple(x.shape)}, load average {os.getloadavg()[0]:.2f}"
    )
    print("| qconfig | float ms/batch | converted ms/batch | converted / float | max diff vs QAT |")
    print("|---|---:|---:|---:|---:|")
    for name in args.qconfig:
        with tq.use_backend("eager"):
            qat = tq.prepare_qat(float_model, named.get(name, name))
            with torch.no_grad():
                qat(x)
            ex.disable_observers(qat)
            converted = tq.convert(qat).eval()
            with torch.no_grad():
                diff = (converted(x) - qat.eval()(x)).abs().max().item()
            f, c, ratio = paired_ms(float_model, converted, x, args.repeats)
        print(f"| {name} | {f:.1f} | {c:.1f} | {ratio:.2f} | {diff:.2e} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
