"""FSDP2 (fully_shard) training with tq.nn.Linear layers matches one unsharded process.

    python bench/fsdp2_check.py [--device cuda|cpu] [--world N] [--steps S]

A small MLP is prepared with tq.prepare_qat ("int8_per_channel" and "int4_per_group", weight
fake quant with per-channel / per-group observers), every tq.nn.Linear and the root are
wrapped with fully_shard, and each of N ranks trains on its slice of a global batch. The
gathered weights and fake-quant buffers are compared with one process training the same
model on the full batch. Exit code 0 when they match, 1 on a mismatch, 2 when the device or
FSDP2 is not available. Ranks are spawned in-process with a file:// rendezvous (no torchrun,
no port). World size: the number of CUDA devices (one rank per GPU), or 2 on the CPU (gloo).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if __package__ in (None, ""):  # run as a script from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton_qat as tq

QCONFIGS = ("int8_per_channel", "int4_per_group")
BATCH, D_IN, D_HIDDEN, D_OUT = 16, 64, 128, 32
# Averaged per-rank gradients against full-batch ones differ by fp32 summation order only
# (about 1e-7 relative per step); a weight that lands next to a fake-quant rounding edge
# could amplify that to a quantization step, which a few SGD steps on this model never do.
RTOL, ATOL = 1e-5, 1e-6


def fully_shard_fn():
    """FSDP2's fully_shard: torch.distributed.fsdp (torch >= 2.6) or its older home."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def make_model(qconfig: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(D_HIDDEN, D_HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(D_HIDDEN, D_OUT),
    )
    return tq.prepare_qat(model, qconfig).to(device)


def batches(steps: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_OUT, generator=g))]
    for _ in range(steps - 1):
        data.append((torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_OUT, generator=g)))
    return [(x.to(device), y.to(device)) for x, y in data]


def train(model, data, world: int, rank: int | None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        if rank is not None:  # this rank's slice of the global batch
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict on the CPU with sharded parameters (DTensors) gathered."""
    out = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = value.detach().cpu().clone()
    return out


def _worker(
    rank: int, world: int, init_file: str, device_type: str, steps: int, backend: str, out: str
):
    tq.set_backend(backend)
    dist_backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    dist.init_process_group(
        dist_backend, init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        fully_shard = fully_shard_fn()
        states = {}
        for qconfig in QCONFIGS:
            model = make_model(qconfig, device)
            for module in model:
                if isinstance(module, tq.nn.Linear):
                    fully_shard(module)
            fully_shard(model)
            train(model, batches(steps, device), world, rank)
            states[qconfig] = full_state(model)
        if rank == 0:
            torch.save(states, out)
    finally:
        dist.destroy_process_group()


def compare(got: dict, expected: dict, label: str) -> list[str]:
    """Mismatch messages (empty when everything matches within RTOL / ATOL)."""
    problems = []
    if list(got) != list(expected):
        return [f"{label}: state_dict keys {list(got)} != {list(expected)}"]
    for key, value in expected.items():
        try:
            torch.testing.assert_close(got[key], value, rtol=RTOL, atol=ATOL)
        except AssertionError as err:
            problems.append(f"{label}: {key}: {str(err).splitlines()[0]}")
    return problems


def run(device_type: str, world: int, steps: int, backend: str = "auto") -> list[str]:
    """Train sharded on `world` ranks and unsharded in this process, both with triton_qat
    backend `backend`; the mismatches."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fsdp2.pt")
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(
            _worker,
            args=(world, init_file, device_type, steps, backend, out),
            nprocs=world,
            join=True,
        )
        sharded = torch.load(out)
    device = torch.device(device_type)
    problems = []
    with tq.use_backend(backend):
        for qconfig in QCONFIGS:
            single = make_model(qconfig, device)
            train(single, batches(steps, device), world, None)
            problems += compare(sharded[qconfig], full_state(single), qconfig)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--world", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fsdp2_check: no CUDA device", file=sys.stderr)
        return 2
    if not dist.is_available():
        print("fsdp2_check: torch.distributed is not built", file=sys.stderr)
        return 2
    try:
        fully_shard_fn()
    except ImportError as err:
        print(f"fsdp2_check: FSDP2 (fully_shard) is not available: {err}", file=sys.stderr)
        return 2
    world = args.world or (torch.cuda.device_count() if device == "cuda" else 2)
    start = time.perf_counter()
    problems = run(device, world, args.steps)
    elapsed = time.perf_counter() - start
    for line in problems:
        print(line)
    status = "MISMATCH" if problems else "match"
    print(
        f"fsdp2_check: {device}, world {world}, {args.steps} steps, {', '.join(QCONFIGS)}: "
        f"sharded vs single process {status} (rtol {RTOL}, atol {ATOL}) in {elapsed:.1f} s"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
