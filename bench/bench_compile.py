"""One QAT training step of a prepared tiny Llama, torch.compile(fullgraph=True) vs eager.

    PYTHONPATH=. python bench/bench_compile.py [--preset NAME ...] [--device cpu|cuda]
        [--backend inductor|aot_eager] [--steps N] [--batch B] [--seq S]

A transformers LlamaForCausalLM (2 layers, hidden 256, 4 heads, intermediate 512, vocab 1024,
random init, no download) goes through tq.prepare_qat with each preset (default: x86,
w4a8_dynamic, int8_per_channel_lsq), observers on. A step is forward, loss, backward and an
SGD step; it is timed on an eager copy and on a compiled copy of the same model, both warmed
up first (the compile's warm-up is reported on its own as compile_s, not in the step times).
Before timing, the two copies' first losses are compared. Prints one row per preset with the
median step times side by side and their ratio (eager / compiled: above 1, compile is faster).

On the CPU the ops take the eager backend (tq.use_backend("eager"): the Triton interpreter
would time Python); on CUDA the default backend (the fused Triton GEMM, a custom op in the
graph). Needs transformers; exits 2 with one line on stderr without it, or without CUDA when
--device cuda is asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _gpu_run import missing_requirements, synchronize

import triton_qat as tq

DEFAULT_PRESETS = ["x86", "w4a8_dynamic", "int8_per_channel_lsq"]
EXIT_UNAVAILABLE = 2


def _model(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency

    config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=512,
        vocab_size=1024,
        num_hidden_layers=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).to(device)


def _step_fn(model, step_model, opt):
    def step(ids):
        loss = step_model(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _loss_of(model):
    def loss(ids):
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
        )

    return loss


def _time(step, batches, device: str) -> list[float]:
    times = []
    for ids in batches:
        synchronize(device)
        start = time.perf_counter()
        step(ids)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def run(preset: str, args) -> dict:
    torch.manual_seed(0)
    eager = tq.prepare_qat(_model(args.device), preset).train()
    compiled_model = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, 1024, (args.batch, args.seq), generator=g).to(args.device)
        for _ in range(args.steps + 2)
    ]
    compiled_loss = torch.compile(_loss_of(compiled_model), fullgraph=True, backend=args.backend)
    eager_step = _step_fn(eager, _loss_of(eager), torch.optim.SGD(eager.parameters(), lr=1e-3))
    compiled_step = _step_fn(
        compiled_model, compiled_loss, torch.optim.SGD(compiled_model.parameters(), lr=1e-3)
    )
    synchronize(args.device)
    start = time.perf_counter()
    first_compiled = compiled_step(batches[0])
    second_compiled = compiled_step(batches[1])  # per-channel buffers sized: one recompile
    synchronize(args.device)
    compile_s = time.perf_counter() - start
    first_eager, second_eager = eager_step(batches[0]), eager_step(batches[1])
    diff = max(
        abs(float(first_eager) - float(first_compiled)),
        abs(float(second_eager) - float(second_compiled)),
    )
    eager_s = statistics.median(_time(eager_step, batches[2:], args.device))
    compiled_s = statistics.median(_time(compiled_step, batches[2:], args.device))
    return {
        "preset": preset,
        "eager_ms": eager_s * 1e3,
        "compiled_ms": compiled_s * 1e3,
        "ratio": eager_s / compiled_s,
        "compile_s": compile_s,
        "loss_diff": diff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", help="a preset (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args(argv)
    if missing_requirements("bench_compile", args.device, ("transformers",)):
        return EXIT_UNAVAILABLE
    backend = tq.use_backend("eager") if args.device == "cpu" else contextlib.nullcontext()
    header = f"{'preset':<22}{'eager ms':>10}{'compiled ms':>13}{'ratio':>8}{'compile s':>11}"
    print(f"one training step, tiny Llama, {args.device}, backend {args.backend}")
    print(header + f"{'loss diff':>11}")
    with backend:
        for preset in args.preset or DEFAULT_PRESETS:
            r = run(preset, args)
            print(
                f"{r['preset']:<22}{r['eager_ms']:>10.1f}{r['compiled_ms']:>13.1f}"
                f"{r['ratio']:>7.2f}x{r['compile_s']:>11.1f}{r['loss_diff']:>11.2e}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
