"""QAT of a transformers Llama, end to end: the recipe, training, convert, save, reload, generate.

A small LlamaForCausalLM is built from a LlamaConfig (random init, nothing downloaded) and
trained on the corpus the main example uses (Python's pydoc_data topics, characters as
tokens). Then, with one realistic recipe chosen per module

    lm_head             float (the output head is the most sensitive layer)
    model.embed_tokens  8-bit per row, float zero points (torch.ao's embedding QAT numerics)
    model.layers.*      w4a8_dynamic: int4 weights in groups of 32, int8 per-token activations

it reports validation perplexity of the float model, PTQ (calibration only), QAT (the float
model fine-tuned with fake quantization), the converted integer model, that model saved and
reloaded (tq.save_converted / tq.load_converted), the compressed-tensors export loaded by
transformers.AutoModelForCausalLM.from_pretrained (what vLLM serves), and a float control
fine-tuned as long as QAT; then generates a few lines with the reloaded model. Under 5
minutes on 2 CPU cores with the defaults:

    pip install -e '.[serve]'       # transformers, compressed-tensors, safetensors
    python examples/hf_llama_qat.py
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch
from torch import Tensor, nn

import triton_qat as tq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qat_tiny_lm import (
    CharData,
    Result,
    RunConfig,
    calibrate,
    disable_observers,
    evaluate,
    load_corpus,
    print_table,
    quant_path,
    train,
)

RECIPE = {
    "lm_head": None,
    "model.embed_tokens": "embedding_int8",
    "model.layers.*": "w4a8_dynamic",
}


class Logits(nn.Module):
    """A causal LM as the main example's loop expects it: token ids in, logits out."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


def build_llama(vocab: int, args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM  # the optional extra
    from transformers.utils import logging

    logging.disable_progress_bar()

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=max(args.seq_len, 256),  # generation runs past training's
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config)


def _from_pretrained(directory: str | os.PathLike) -> nn.Module:
    import warnings

    from transformers import AutoModelForCausalLM  # the optional extra

    with warnings.catch_warnings():  # the format's own notices about its compressors
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(directory).eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Float vs PTQ vs QAT of a small transformers Llama, convert, save, reload.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=500, help="float training steps")
    p.add_argument("--qat-steps", type=int, default=150, help="QAT fine-tuning steps")
    p.add_argument("--hidden", type=int, default=128, help="a multiple of 32 and of --heads")
    p.add_argument("--intermediate", type=int, default=320, help="a multiple of 32")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--qat-lr", type=float, default=5e-4)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=24576, help="0: the whole split")
    p.add_argument("--generate", type=int, default=160, help="characters to generate")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="directory for the saved model (default: a temp)")
    args = p.parse_args(argv)
    if args.hidden % 32 or args.hidden % args.heads or args.intermediate % 32:
        p.error("--hidden and --intermediate must be multiples of 32 (int4 groups)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    log_every = args.log_every or max(1, max(args.steps, args.qat_steps) // 5)
    cfg = RunConfig(device, autocast, args.batch_size, args.seq_len, log_every=log_every)
    data = CharData.from_text(load_corpus())
    val = data.val_batches(args.batch_size, args.seq_len, device, args.eval_tokens)

    model = Logits(build_llama(len(data.vocab), args)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"triton_qat {tq.__version__}, torch {torch.__version__}, device {device}, "
        f"fake quant runs: {quant_path(device)}\n"
        f"LlamaForCausalLM: {args.layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.heads} heads, {n_params / 1e6:.2f}M parameters, "
        f"vocabulary {len(data.vocab)} characters\nrecipe: {RECIPE}",
        flush=True,
    )
    results: dict[str, Result] = {}
    n, m = args.steps, args.qat_steps

    def record(key: str, variant: str, steps: str, mod: nn.Module, ms: float | None) -> None:
        loss, eval_ms = evaluate(mod, val, cfg)
        path = quant_path(device) if key not in ("float", "control") else f"torch ({device.type})"
        results[key] = Result(variant, steps, loss, eval_ms, ms, path)
        print(f"  {variant}: val loss {loss:.4f}, perplexity {math.exp(loss):.3f}", flush=True)

    def prepare(float_model: Logits) -> Logits:
        return Logits(tq.prepare_qat(float_model.lm, RECIPE))

    print(f"\n1/5 float training, {n} steps", flush=True)
    ms = train(model, data, cfg, steps=n, lr=args.lr, seed=args.seed, label="float")
    record("float", "float", str(n), model, ms)

    print("\n2/5 PTQ: the recipe, calibrated", flush=True)
    ptq = prepare(model)
    print("   " + str(tq.qat_summary(ptq.lm)).splitlines()[0], flush=True)
    calibrate(ptq, data, cfg, args.calib_batches, seed=args.seed + 1)
    record("ptq", "PTQ", str(n), ptq, None)

    print(f"\n3/5 QAT, {m} steps", flush=True)
    qat = prepare(model)
    ms = train(qat, data, cfg, steps=m, lr=args.qat_lr, seed=args.seed + 2, label="QAT")
    disable_observers(qat)
    record("qat", "QAT", f"{n}+{m}", qat, ms)
    control = copy.deepcopy(model)
    ms = train(control, data, cfg, steps=m, lr=args.qat_lr, seed=args.seed + 2, label="control")
    record("control", "float, fine-tuned (control)", f"{n}+{m}", control, ms)

    print("\n4/5 convert, save, reload", flush=True)
    converted = Logits(tq.convert(qat.lm))
    record("converted", "QAT, converted", f"{n}+{m}", converted, None)
    out = args.out or tempfile.mkdtemp(prefix="hf_llama_qat_")
    # triton_qat's own format: the converted state_dict in safetensors; the float
    # architecture alone rebuilds it (no qconfig, no prepare / convert).
    saved = tq.save_converted(converted.lm, os.path.join(out, "triton_qat"), overwrite=True)
    shell = build_llama(len(data.vocab), args)
    reloaded = Logits(tq.load_converted(shell, saved).to(device))
    record("reloaded", "converted, reloaded", f"{n}+{m}", reloaded, None)
    size = sum(f.stat().st_size for f in saved.iterdir())
    print(f"   saved to {saved} ({size / 1024:.0f} KiB)", flush=True)
    # The serving format: a compressed-tensors checkpoint transformers (and vLLM) load.
    exported = tq.export_compressed_tensors(
        converted.lm, os.path.join(out, "compressed-tensors"), overwrite=True
    )
    served = Logits(_from_pretrained(exported).to(device))
    record("served", "compressed-tensors, from_pretrained", f"{n}+{m}", served, None)

    print("\n5/5 generate with the reloaded model", flush=True)
    prompt = "The for statement"
    ids = torch.tensor([[data.vocab.index(c) for c in prompt]], device=device)
    with torch.no_grad():
        gen = reloaded.lm.generate(ids, max_new_tokens=args.generate, do_sample=False)
    print("   " + "".join(data.vocab[i] for i in gen[0].tolist()).replace("\n", "\n   "))

    print()
    order = ("float", "ptq", "qat", "converted", "reloaded", "served", "control")
    print_table([results[k] for k in order])
    flt, ptq_ppl, qat_ppl = results["float"].ppl, results["ptq"].ppl, results["qat"].ppl
    ctl, conv, rel = results["control"].ppl, results["converted"].ppl, results["reloaded"].ppl
    served_ppl = results["served"].ppl
    print(
        f"\nPTQ {ptq_ppl:.3f} vs float {flt:.3f}; QAT {qat_ppl:.3f} vs the float control "
        f"{ctl:.3f}.\nConverted {conv:.4f}, reloaded {rel:.4f}: "
        f"{'equal' if conv == rel else 'DIFFERENT'}; served by transformers from the "
        f"compressed-tensors export {served_ppl:.4f} ({served_ppl - conv:+.4f}: its per-token "
        "activation formula rounds x / s where triton_qat rounds x * (1 / s), README)."
    )
    conv_ms, float_ms = results["converted"].eval_ms, results["float"].eval_ms
    print(
        f"Converted eval {conv_ms:.1f} ms per batch, {conv_ms / float_ms:.2f}x the float "
        f"model's {float_ms:.1f} ms (measured one after the other; "
        "bench/bench_converted.py --model llama alternates them)."
    )
    print(f"Total wall time {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main(sys.argv[1:])
