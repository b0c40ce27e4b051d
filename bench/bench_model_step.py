"""A whole training step of a transformers Llama, float against QAT: tokens per second and peak
memory, eager and torch.compile'd, side by side in one run.

    PYTHONPATH=. python bench/bench_model_step.py [--device cuda|cpu] [--layers 2] [--seq 2048]
        [--batch 1] [--variant NAME ...] [--mode eager|compiled ...] [--steps 5]
        [--budget-s S] [--out DIR] [--tiny]

The model: a LlamaForCausalLM built from a config (hidden 4096, intermediate 14336, 32 heads, 8
key / value heads, vocab 32000, --layers decoder layers; random init, no download), bf16
weights, AdamW (lr 1e-5); a step is forward, the model's cross-entropy loss, backward and the
optimizer step, on batch x seq random tokens. Variants (each from the same initial weights):

    float                 the model as built
    tq_w4a8_dynamic       tq.prepare_qat with w4a8_dynamic: int4 symmetric weights per group of
                          32, int8 asymmetric per-token inputs, fused into the GEMMs
    tq_int8_per_channel   tq.prepare_qat with int8_per_channel (weights only)
    torchao_8da4w         torchao's QAT with the same numerics as tq_w4a8_dynamic (quantize_
                          with a QATConfig of IntxFakeQuantizeConfig: int8 asymmetric per
                          token, int4 symmetric per group of 32); skipped without torchao

Only the decoder's Linear layers are quantized: the embedding and lm_head stay float in every
QAT variant (torchao's QAT touches Linear layers only; both libraries' LLM recipes keep lm_head
float). Each variant runs eager and with its model compiled by torch.compile (default options;
the optimizer step stays eager). Warm-up steps come first, at least 2 (for a compiled model
they hold the compilation and the one recompile after the first step, once per-group buffers
have their shapes; their time is reported as warmup_s); then the median of --steps timed steps.
tokens/s = batch * seq / step time; peak memory = torch.cuda.max_memory_allocated over the
warm-up and timed steps (weights, gradients, AdamW state, activations); each ratio is against
float in the same mode. The issue's targets: QAT within 1.05x of the float step, and faster
than torchao's QAT.

Rows run in the order eager float, eager tq_*, eager torchao, then the same compiled; with
--budget-s a row that would start after that many seconds is left out (listed as skipped).
--out DIR writes model_step.json there after every row. On a CPU (--device cpu, e.g. --tiny,
a 2-layer hidden-256 model) the triton_qat variants take the eager backend (the Triton
interpreter would time Python) and no memory is reported: a run of the plumbing, not a figure.
Exit 2 with one line on stderr without transformers, or without CUDA for --device cuda.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, "") and str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from _gpu_run import gpu_run_metadata, missing_requirements, synchronize

import triton_qat as tq

EXIT_UNAVAILABLE = 2
VARIANTS = ["float", "tq_w4a8_dynamic", "tq_int8_per_channel", "torchao_8da4w"]
MODES = ["eager", "compiled"]
# The model: Llama-3-8B's layer shapes.
FULL = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 32000}
TINY = {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 2, "vocab": 1024}
TQ_PRESETS = {"tq_w4a8_dynamic": "w4a8_dynamic", "tq_int8_per_channel": "int8_per_channel"}


def build_model(shape: dict, layers: int, seq: int, device: str, dtype: torch.dtype):
    """The Llama of `shape` with `layers` decoder layers, seeded: every variant starts from the
    same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM  # optional dependency

    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        num_hidden_layers=layers,
        max_position_embeddings=seq,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).train()


def torchao_missing() -> str | None:
    """Why torchao's QAT cannot run here (None: it can)."""
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig  # noqa: F401
    except ImportError:
        return "torchao missing"
    except Exception as e:  # a torchao built for another torch may fail on import
        return f"torchao unusable: {type(e).__name__}: {e}"
    return None


def prepare(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The variant's QAT model (float: the model itself)."""
    if variant == "float":
        return model
    if variant in TQ_PRESETS:
        recipe = {"lm_head": None, "model.embed_tokens": None, "*": TQ_PRESETS[variant]}
        return tq.prepare_qat(model, recipe)
    if variant == "torchao_8da4w":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        config = QATConfig(
            activation_config=IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
            weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True),
            step="prepare",
        )
        body = model.model  # the decoder; lm_head stays float
        quantize_(body, config, filter_fn=lambda m, _: isinstance(m, torch.nn.Linear))
        return model
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def run_row(variant: str, mode: str, args, shape: dict) -> dict:
    """Build, prepare, warm up and time one (variant, mode); the row's figures."""
    device = args.device
    model = prepare(build_model(shape, args.layers, args.seq, device, args.dtype), variant)
    if mode == "compiled":
        # Each row's model is new to dynamo: without a reset the rows' graphs pile up on the
        # same code objects until dynamo's recompile limit sends a row back to eager.
        torch._dynamo.reset()
    forward = torch.compile(model) if mode == "compiled" else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    n = args.warmup + args.steps
    batches = [
        torch.randint(0, shape["vocab"], (args.batch, args.seq), generator=g).to(device)
        for _ in range(n)
    ]

    def step(ids):
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    first_loss = float(step(batches[0]))
    for ids in batches[1 : args.warmup]:
        step(ids)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    times = []
    for ids in batches[args.warmup :]:
        synchronize(device)
        start = time.perf_counter()
        step(ids)
        synchronize(device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {
        "variant": variant,
        "mode": mode,
        "step_ms": step_s * 1e3,
        "tokens_per_s": args.batch * args.seq / step_s,
        "peak_gib": peak,
        "warmup_s": warmup_s,
        "first_loss": first_loss,
    }


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with step / peak ratios against float in its mode (None where float is
    missing)."""
    floats = {r["mode"]: r for r in rows if r["variant"] == "float" and "step_ms" in r}
    out = []
    for r in rows:
        base = floats.get(r["mode"])
        r = dict(r)
        if base is not None and "step_ms" in r:
            r["step_vs_float"] = r["step_ms"] / base["step_ms"]
            both = r["peak_gib"] is not None and base["peak_gib"] is not None
            r["peak_vs_float"] = r["peak_gib"] / base["peak_gib"] if both else None
        out.append(r)
    return out


def table(rows: list[dict]) -> str:
    head = (
        f"{'variant':<22}{'mode':<10}{'step ms':>10}{'tokens/s':>11}{'x float':>9}"
        f"{'peak GiB':>10}{'x float':>9}{'warmup s':>10}{'loss':>9}"
    )
    lines = [head]
    for r in rows:
        if "step_ms" not in r:
            lines.append(f"{r['variant']:<22}{r['mode']:<10}  {r['skipped']}")
            continue
        ratio = r.get("step_vs_float")
        peak, peak_ratio = r["peak_gib"], r.get("peak_vs_float")
        lines.append(
            f"{r['variant']:<22}{r['mode']:<10}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11.0f}"
            + (f"{ratio:>8.3f}x" if ratio is not None else f"{'-':>9}")
            + (f"{peak:>10.2f}" if peak is not None else f"{'-':>10}")
            + (f"{peak_ratio:>8.3f}x" if peak_ratio is not None else f"{'-':>9}")
            + f"{r['warmup_s']:>10.1f}{r['first_loss']:>9.3f}"
        )
    return "\n".join(lines)


def plan(variants: list[str], modes: list[str]) -> list[tuple[str, str]]:
    """(variant, mode) in running order: float first in each mode (the ratios' base)."""
    ordered = sorted(variants, key=VARIANTS.index)
    return [(v, m) for m in sorted(modes, key=MODES.index) for v in ordered]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variant", action="append", choices=VARIANTS, help="repeatable")
    parser.add_argument("--mode", action="append", choices=MODES, help="repeatable")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row (>= 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--budget-s", type=float, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="hidden 256: a CPU-sized model")
    args = parser.parse_args(argv)
    if args.warmup < 2 or args.steps < 1:
        parser.error(
            "--warmup must be at least 2 (a compiled QAT model recompiles once after "
            "its first step) and --steps at least 1"
        )
    args.dtype = torch.bfloat16
    if missing_requirements("bench_model_step", args.device, ("transformers",)):
        return EXIT_UNAVAILABLE
    # The card, torch and triton of a GPU run, in the record (None on the CPU).
    run = gpu_run_metadata("bench_model_step") if args.device == "cuda" else None
    if args.device == "cuda" and run is None:
        return EXIT_UNAVAILABLE  # TRITON_INTERPRET set: it said so
    shape = TINY if args.tiny else FULL
    variants = args.variant or VARIANTS
    rows: list[dict] = []
    started = time.perf_counter()
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    title = (
        f"one training step (AdamW), Llama hidden {shape['hidden']}, intermediate "
        f"{shape['intermediate']}, {args.layers} layers, batch {args.batch} x seq {args.seq}, "
        f"bf16, {where}"
    )
    print(title, flush=True)
    backend = tq.use_backend("eager") if args.device == "cpu" else contextlib.nullcontext()
    with backend:
        for variant, mode in plan(variants, args.mode or MODES):
            missing = torchao_missing() if variant == "torchao_8da4w" else None
            if missing is not None:
                rows.append({"variant": variant, "mode": mode, "skipped": missing})
            elif args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                rows.append({"variant": variant, "mode": mode, "skipped": "out of budget"})
            else:
                rows.append(run_row(variant, mode, args, shape))
                gc.collect()  # the row's model, optimizer state and graphs
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            last = with_ratios(rows)[-1]
            print(table([last]).splitlines()[-1], flush=True)
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                record = {"title": title, "run": run, "rows": with_ratios(rows)}
                (args.out / "model_step.json").write_text(json.dumps(record, indent=1) + "\n")
    print()
    print(table(with_ratios(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
