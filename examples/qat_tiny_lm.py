"""Quantization-aware training of a tiny character-level language model, end to end.

Trains a small decoder-only transformer on text that ships with Python (the documentation
topics of the standard library's pydoc_data: nothing is downloaded), then reports the
validation perplexity of

  float               the float model, trained --steps steps;
  PTQ                 post-training quantization of it with --qconfig (default w4a8_dynamic:
                      int4 per-group weights, int8 per-token dynamic activations): qparams
                      from a few calibration batches, no training;
  QAT                 the same quantized model fine-tuned from the float one with fake
                      quantization on, --qat-steps more steps at a lower learning rate;
  QAT, converted      the QAT model frozen by tq.convert (integer weights, trained qparams);
  float, fine-tuned   the control: the float model fine-tuned exactly as QAT was (same steps,
                      batches and learning rates) without fake quantization;
  PTQ of the control  post-training quantization of the control.

QAT's extra steps also train the model further, so how much of PTQ's loss QAT recovers is
measured against the control, a float model trained as long as QAT was.

The defaults run in under 5 minutes on 2 CPU cores (eager fake quant); on a CUDA GPU the
fake quant runs as Triton kernels under bf16 autocast, and flags scale the run up:

    python examples/qat_tiny_lm.py
    python examples/qat_tiny_lm.py --steps 4000 --qat-steps 1000 --d-model 384 --layers 6 \\
        --heads 6 --seq-len 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import triton_qat as tq

DEFAULT_QCONFIG = "w4a8_dynamic"  # int4 per-group weights, int8 per-token dynamic activations
FALLBACK_QCONFIG = "int4_per_group"  # weights only, for a triton_qat without the preset


# --- data ----------------------------------------------------------------------------------


def load_corpus() -> str:
    """Python's documentation topics (pydoc_data.topics, about 460k characters), in a fixed
    order so that every run sees the same text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


@dataclass
class CharData:
    """A character vocabulary and the encoded train / validation splits."""

    vocab: list[str]
    train: Tensor  # int64 character ids
    val: Tensor

    @classmethod
    def from_text(cls, text: str, val_fraction: float = 0.1) -> CharData:
        """Vocabulary of every character in `text`; the last `val_fraction` is validation."""
        vocab = sorted(set(text))
        index = {ch: i for i, ch in enumerate(vocab)}
        ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        split = int(len(ids) * (1 - val_fraction))
        return cls(vocab, ids[:split], ids[split:])

    def train_batches(
        self, batch_size: int, seq_len: int, seed: int, device: torch.device
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless random (input, target) windows of the training split; the same seed gives
        the same sequence of batches."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            starts = torch.randint(len(self.train) - seq_len - 1, (batch_size,), generator=gen)
            yield _windows(self.train, starts, seq_len, device)

    def val_batches(
        self, batch_size: int, seq_len: int, device: torch.device, max_tokens: int
    ) -> list[tuple[Tensor, Tensor]]:
        """Consecutive, non-overlapping windows over the validation split (its first
        `max_tokens` characters when positive): every model is scored on the same characters."""
        n_windows = (len(self.val) - 1) // seq_len
        if max_tokens > 0:
            n_windows = min(n_windows, max(1, max_tokens // seq_len))
        starts = torch.arange(n_windows) * seq_len
        return [
            _windows(self.val, starts[i : i + batch_size], seq_len, device)
            for i in range(0, n_windows, batch_size)
        ]


def _windows(
    ids: Tensor, starts: Tensor, seq_len: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    rows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])
    rows = rows.to(device, non_blocking=True)
    return rows[:, :-1], rows[:, 1:]


# --- model ---------------------------------------------------------------------------------
# Every projection is an nn.Linear called as a module, so tq.prepare_qat swaps all of them
# (nn.MultiheadAttention would hide its output projection from the swap).


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)  # q, k and v projections in one GEMM
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
            for y in self.qkv(x).split(d, dim=-1)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyLM(nn.Module):
    """A decoder-only character transformer with learned positions and its own output head."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


# --- training and evaluation -----------------------------------------------------------------


@dataclass
class RunConfig:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    batch_size: int
    seq_len: int
    weight_decay: float = 0.1
    log_every: int = 50


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(cfg: RunConfig) -> torch.autocast:
    dtype = cfg.autocast_dtype or torch.float32
    return torch.autocast(cfg.device.type, dtype=dtype, enabled=cfg.autocast_dtype is not None)


def train(
    model: nn.Module,
    data: CharData,
    cfg: RunConfig,
    *,
    steps: int,
    lr: float,
    seed: int,
    label: str,
    losses: list[float] | None = None,
) -> float:
    """AdamW with a linear warmup and a cosine decay to lr / 10. Prints a progress line every
    cfg.log_every steps; returns the median wall time of a training step, in ms. Each step's
    loss is appended to `losses` when given."""
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
        foreach=True,
    )
    warmup = max(1, min(100, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    batches = data.train_batches(cfg.batch_size, cfg.seq_len, seed, cfg.device)
    step_ms: list[float] = []
    start = time.perf_counter()
    running = None
    for step in range(steps):
        x, y = next(batches)
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with _autocast(cfg):
            loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()  # synchronizes with the device
        if losses is not None:
            losses.append(value)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        running = value if running is None else 0.9 * running + 0.1 * value
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            print(
                f"  [{label}] step {step + 1:>5}/{steps}  train loss {running:.3f}  "
                f"lr {lr_at(step):.1e}  {_median(step_ms):6.1f} ms/step  "
                f"elapsed {time.perf_counter() - start:6.1f} s",
                flush=True,
            )
    return _median(step_ms)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], cfg: RunConfig
) -> tuple[float, float]:
    """(mean cross-entropy per character, median ms per batch) over the validation batches."""
    model.eval()
    total, count, batch_ms = 0.0, 0, []
    for x, y in batches:
        _sync(cfg.device)
        t0 = time.perf_counter()
        with _autocast(cfg):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total += loss.item()
        batch_ms.append((time.perf_counter() - t0) * 1e3)
        count += y.numel()
    return total / count, _median(batch_ms)


@torch.no_grad()
def calibrate(model: nn.Module, data: CharData, cfg: RunConfig, n_batches: int, seed: int) -> None:
    """PTQ calibration: run a few training batches through the prepared model with its
    observers on and no gradient, then freeze the qparams they chose."""
    model.eval()
    batches = data.train_batches(cfg.batch_size, cfg.seq_len, seed, cfg.device)
    for _ in range(n_batches):
        x, _ = next(batches)
        with _autocast(cfg):
            model(x)
    disable_observers(model)


def disable_observers(model: nn.Module) -> None:
    """Freeze the qparams of every triton_qat fake-quant module (as torch.ao's
    `model.apply(torch.ao.quantization.disable_observer)`); fake quantization stays on."""
    from triton_qat.quantizers import FakeQuantizeBase

    for m in model.modules():
        if isinstance(m, FakeQuantizeBase):
            m.disable_observer()


def _median(values: list[float]) -> float:
    return float(torch.tensor(values).median()) if values else float("nan")


# --- reporting -----------------------------------------------------------------------------


@dataclass
class Result:
    variant: str
    steps: str
    val_loss: float
    eval_ms: float
    train_ms: float | None
    backend: str

    @property
    def ppl(self) -> float:
        return math.exp(self.val_loss)


def print_table(results: list[Result]) -> None:
    header = (
        "variant",
        "train steps",
        "val loss",
        "val ppl",
        "train ms/step",
        "eval ms/batch",
        "backend",
    )
    rows = [
        (
            r.variant,
            r.steps,
            f"{r.val_loss:.4f}",
            f"{r.ppl:.3f}",
            "-" if r.train_ms is None else f"{r.train_ms:.1f}",
            f"{r.eval_ms:.1f}",
            r.backend,
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    # Text columns left-aligned, numbers right-aligned.
    align = ["<", "<", ">", ">", ">", ">", "<"]

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths, strict=True))
            + " |"
        )

    print(line(header))
    print(
        "|"
        + "|".join(
            ("-" * (w + 1) + ":" if a == ">" else "-" * (w + 2))
            for a, w in zip(align, widths, strict=True)
        )
        + "|"
    )
    for row in rows:
        print(line(row))


def quant_path(device: torch.device) -> str:
    """What runs triton_qat's fake quant for tensors on `device` under the backend in force,
    e.g. "eager (auto)" or "triton compiled (auto)"."""
    from triton_qat.ops.backend import use_triton  # the very decision triton_qat's ops make

    if not use_triton(device):  # backend "triton" that cannot run raises here, naming why
        return f"eager ({tq.get_backend()})"
    from triton_qat.kernels import INTERPRETED_KERNELS

    how = "interpreted" if INTERPRETED_KERNELS else "compiled"
    return f"triton {how} ({tq.get_backend()})"


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the float weights of every quantized Linear, bytes of their integer codes
    plus scales and zero points) in a converted model."""
    float_bytes = int_bytes = 0
    for m in model.modules():
        if hasattr(m, "qweight"):
            float_bytes += m.in_features * m.out_features * 4
            for name in ("qweight", "weight_scale", "weight_zero_point"):
                t = getattr(m, name)
                int_bytes += t.numel() * t.element_size()
    return float_bytes, int_bytes


def resolve_qconfig_name(name: str) -> str:
    """`name` if triton_qat knows it; the weights-only int4 preset in place of the default
    when this triton_qat lacks it (with a note); a KeyError listing the names otherwise."""
    try:
        tq.get_qconfig(name)
    except KeyError:
        if name != DEFAULT_QCONFIG:
            raise
        print(
            f"note: this triton_qat has no {name!r} qconfig; using {FALLBACK_QCONFIG!r} "
            "(int4 per-group weights, float activations) instead",
            flush=True,
        )
        return FALLBACK_QCONFIG
    return name


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Float vs PTQ vs QAT perplexity of a tiny character transformer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=700, help="float training steps")
    p.add_argument("--qat-steps", type=int, default=250, help="QAT fine-tuning steps")
    p.add_argument("--d-model", type=int, default=128, help="width (a multiple of 32)")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="float peak learning rate")
    p.add_argument("--qat-lr", type=float, default=5e-4, help="QAT (and control) peak LR")
    p.add_argument("--calib-batches", type=int, default=8, help="PTQ calibration batches")
    p.add_argument(
        "--eval-tokens", type=int, default=0, help="validation characters scored (0: all)"
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=0,
        help="progress line every N steps (0: about 8 lines per phase)",
    )
    p.add_argument("--qconfig", default=DEFAULT_QCONFIG, help="a registered triton_qat qconfig")
    p.add_argument(
        "--backend",
        choices=["auto", "triton", "eager"],
        default="auto",
        help="triton_qat backend; 'triton' on a CPU runs the Triton interpreter "
        "(slow: for checking, not training)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.d_model % 32 or args.d_model % args.heads:
        p.error("--d-model must be a multiple of 32 (the int4 group size) and of --heads")
    for flag in ("steps", "qat_steps", "layers", "seq_len", "batch_size", "calib_batches"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.backend == "triton" and device.type == "cpu":
        # The kernels run on a CPU only interpreted; Triton reads this when first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    tq.set_backend(args.backend)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.dtype == "auto":
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    else:
        autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
    qconfig = resolve_qconfig_name(args.qconfig)
    log_every = args.log_every or max(1, max(args.steps, args.qat_steps) // 8)
    cfg = RunConfig(device, autocast_dtype, args.batch_size, args.seq_len, log_every=log_every)

    data = CharData.from_text(load_corpus())
    val = data.val_batches(args.batch_size, args.seq_len, device, args.eval_tokens)
    model = TinyLM(len(data.vocab), args.d_model, args.layers, args.heads, args.seq_len)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    print(
        f"triton_qat {tq.__version__}, torch {torch.__version__}, device {device}, "
        f"{torch.get_num_threads()} threads, autocast {autocast_dtype or 'off'}, "
        f"qconfig {qconfig!r}, fake quant runs: {quant_path(device)}\n"
        f"corpus: pydoc_data.topics, {len(data.train):,} train / {len(data.val):,} val "
        f"characters, vocabulary {len(data.vocab)}; scoring {sum(y.numel() for _, y in val):,} "
        f"val characters\n"
        f"model: {args.layers} blocks, d_model {args.d_model}, {args.heads} heads, context "
        f"{args.seq_len}, {n_params / 1e6:.2f}M parameters, {n_linear} nn.Linear",
        flush=True,
    )
    results: dict[str, Result] = {}
    float_path = f"torch ({device.type})"
    n, m = args.steps, args.qat_steps
    n_plus_m = f"{n}+{m}"

    def record(
        key: str, variant: str, steps: str, model_: nn.Module, train_ms: float | None, path: str
    ) -> None:
        loss, eval_ms = evaluate(model_, val, cfg)
        results[key] = Result(variant, steps, loss, eval_ms, train_ms, path)
        print(f"  {variant}: val loss {loss:.4f}, perplexity {math.exp(loss):.3f}", flush=True)

    def ptq_of(float_model: nn.Module) -> nn.Module:
        quantized = tq.prepare_qat(float_model, qconfig)  # a copy: float_model is kept
        calibrate(quantized, data, cfg, args.calib_batches, seed=args.seed + 1)
        return quantized

    print(f"\n1/4 float training, {n} steps", flush=True)
    ms = train(model, data, cfg, steps=n, lr=args.lr, seed=args.seed, label="float")
    record("float", "float", str(n), model, ms, float_path)

    print(f"\n2/4 post-training quantization, {args.calib_batches} calibration batches", flush=True)
    record("ptq", f"PTQ {qconfig}", str(n), ptq_of(model), None, quant_path(device))

    print(f"\n3/4 QAT: fine-tuning the float model with fake quant on, {m} steps", flush=True)
    qat = tq.prepare_qat(model, qconfig)
    ms = train(qat, data, cfg, steps=m, lr=args.qat_lr, seed=args.seed + 2, label="QAT")
    disable_observers(qat)  # evaluate (and convert) with the trained qparams
    record("qat", f"QAT {qconfig}", n_plus_m, qat, ms, quant_path(device))

    # The control: the float model fine-tuned exactly as QAT was (same batches, same LR), so
    # that QAT is compared with float and PTQ models trained as long as it was.
    print(
        f"\n   control: the float model fine-tuned the same {m} steps, without fake quant",
        flush=True,
    )
    control = copy.deepcopy(model)
    ms = train(control, data, cfg, steps=m, lr=args.qat_lr, seed=args.seed + 2, label="control")
    record("control", "float, fine-tuned (control)", n_plus_m, control, ms, float_path)
    record("control_ptq", "PTQ of the control", n_plus_m, ptq_of(control), None, quant_path(device))

    print("\n4/4 tq.convert(QAT model): integer weights, the trained qparams", flush=True)
    converted = tq.convert(qat)
    record("converted", "QAT, converted", n_plus_m, converted, None, quant_path(device))

    order = ("float", "ptq", "qat", "converted", "control", "control_ptq")
    print()
    print_table([results[k] for k in order])
    print()
    report(results, converted)
    print(f"Total wall time {time.perf_counter() - wall_start:.0f} s.")


def report(r: dict[str, Result], converted: nn.Module) -> None:
    """The summary lines under the table: what PTQ loses, how much of it QAT recovers."""
    flt, ptq, qat = r["float"].ppl, r["ptq"].ppl, r["qat"].ppl
    ctl, ctl_ptq = r["control"].ppl, r["control_ptq"].ppl
    lost = ctl_ptq - ctl  # what PTQ costs at QAT's training budget
    print(
        f"PTQ lost {ptq - flt:.3f} ppl ({flt:.3f} -> {ptq:.3f}, {100 * (ptq / flt - 1):+.1f}%); "
        f"on the float model trained as long as QAT: {lost:.3f} ppl ({ctl:.3f} -> {ctl_ptq:.3f})."
    )
    if lost > 0:
        print(
            f"QAT recovered {100 * (ctl_ptq - qat) / lost:.0f}% of it: {qat:.3f}, "
            f"{qat - ctl:+.3f} ppl from the float model trained as long (same steps, same "
            "batches)."
        )
    else:
        print(f"PTQ lost nothing to recover; QAT: {qat:.3f} ({qat - ctl:+.3f} vs float).")
    conv = r["converted"].ppl
    same = math.isclose(conv, qat, rel_tol=1e-4)
    print(
        f"tq.convert: val ppl {conv:.4f} vs QAT {qat:.4f}: "
        f"{'equal' if same else 'DIFFERENT'} (to 1e-4 relative)."
    )
    float_bytes, int_bytes = linear_weight_bytes(converted)
    if float_bytes:
        print(
            f"Linear weights: {float_bytes / 1024:.0f} KiB as fp32 -> {int_bytes / 1024:.0f} KiB "
            f"as integer codes plus scales and zero points ({float_bytes / int_bytes:.1f}x "
            "smaller)."
        )


if __name__ == "__main__":
    main(sys.argv[1:])
