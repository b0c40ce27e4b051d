"""Embedding QAT step: triton_qat's tq.nn.Embedding against torch.ao's and torchao's QAT
embeddings, measured side by side in one process.

    PYTHONPATH=. python bench/bench_embedding.py [--num 32000] [--dim 512] [--tokens 2048]

One step = forward of a batch of token ids, backward of a fixed upstream gradient, weight
gradient reset. Rows, same numerics within each group:
  per-row 8-bit, float zero points: tq.nn.Embedding("embedding_int8") vs torch.ao.nn.qat.Embedding
      (default_embedding_qat_qconfig); torchao's int8 per-channel asymmetric config beside them
  int4 groups of 32 along embedding_dim: tq.nn.Embedding("int4_per_group") vs torchao's
      FakeQuantizedEmbedding(IntxFakeQuantizeConfig(torch.int4, group_size=32)) (torch.ao has none)
On a CPU triton_qat runs its eager path (gathered rows only); on CUDA its Triton kernels. The
median of --reps timed steps (after warm-up) is printed with the ratio to triton_qat's.
Timing is informative only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

import triton_qat as tq


def _time_step(module: torch.nn.Module, idx: torch.Tensor, dy: torch.Tensor, reps: int) -> float:
    """Median seconds of one forward + backward + grad reset."""
    sync = torch.cuda.synchronize if idx.is_cuda else (lambda: None)

    def step() -> None:
        module(idx).backward(dy)
        module.weight.grad = None

    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _torchao_embedding(num: int, dim: int, config_kwargs: dict) -> torch.nn.Module | None:
    try:
        from torchao.quantization.qat import FakeQuantizedEmbedding, IntxFakeQuantizeConfig
    except Exception as err:  # torchao is optional here
        print(f"torchao not available: {err}")
        return None
    config = IntxFakeQuantizeConfig(**config_kwargs)
    return FakeQuantizedEmbedding(num, dim, weight_config=config)


def _build(num: int, dim: int, device: str) -> dict[str, dict[str, Callable[[], torch.nn.Module]]]:
    ao = torch.ao.quantization

    def ours(qconfig: str) -> Callable[[], torch.nn.Module]:
        return lambda: tq.nn.Embedding(num, dim, qconfig=qconfig, device=device)

    def theirs_ao() -> torch.nn.Module:
        return torch.ao.nn.qat.Embedding(
            num, dim, qconfig=ao.default_embedding_qat_qconfig, device=device
        )

    return {
        "per-row 8-bit": {
            "triton_qat": ours("embedding_int8"),
            "torch.ao": theirs_ao,
            "torchao int8/channel": lambda: _torchao_embedding(
                num, dim, {"dtype": torch.int8, "granularity": "per_channel"}
            ),
        },
        "int4 group 32": {
            "triton_qat": ours("int4_per_group"),
            "torchao": lambda: _torchao_embedding(
                num, dim, {"dtype": torch.int4, "group_size": 32, "is_symmetric": True}
            ),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=32000, help="num_embeddings (rows)")
    parser.add_argument("--dim", type=int, default=512, help="embedding_dim")
    parser.add_argument("--tokens", type=int, default=2048, help="indices per step")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    idx = torch.randint(0, args.num, (args.tokens,), device=args.device)
    dy = torch.randn(args.tokens, args.dim, device=args.device)
    path = "Triton kernels" if tq.ops.use_triton(torch.device(args.device)) else "eager path"
    print(
        f"table {args.num}x{args.dim} fp32, {args.tokens} indices, device {args.device} "
        f"(triton_qat: {path}), {torch.get_num_threads()} threads, median of {args.reps}"
    )
    for group, makers in _build(args.num, args.dim, args.device).items():
        times: dict[str, float] = {}
        for name, make in makers.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = make()
            if module is None:
                continue
            times[name] = _time_step(module.to(args.device), idx, dy, args.reps)
        base = times["triton_qat"]
        print(f"\n{group}")
        for name, t in times.items():
            print(f"  {name:22s} {t * 1e3:9.2f} ms   {t / base:6.2f}x triton_qat's time")


if __name__ == "__main__":
    main()
