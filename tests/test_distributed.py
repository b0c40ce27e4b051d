"""DDP training with tq layers gives the weights one process gets on the full batch (CPU, gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import triton_qat as tq

WORLD = 2
STEPS = 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 32, generator=g), torch.randn(8, 8, generator=g)) for _ in range(STEPS)]


def _train(model: torch.nn.Module, batches, rank: int | None) -> None:
    """SGD steps, on this rank's half of each global batch (the whole batch for rank None)."""
    _fsdp2_check().train(model, batches, WORLD, rank)


def _worker(rank: int, port: int, qconfig: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tq.prepare_qat(_model(), qconfig)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        _train(ddp, _batches(), rank)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("qconfig", ["int8_per_channel", "int4_per_group"])
def test_ddp_matches_single_process(tmp_path, qconfig):
    # Weight-only qconfigs: every rank observes the same weights, so the fake-quant state is
    # the full-batch run's too (input observers would see only their rank's half).
    mp.spawn(_worker, args=(_free_port(), qconfig, str(tmp_path)), nprocs=WORLD, join=True)
    single = tq.prepare_qat(_model(), qconfig)
    _train(single, _batches(), None)
    expected = single.state_dict()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(got) == list(expected)
        for key, value in expected.items():
            # Averaged half-batch gradients vs full-batch ones: fp32 summation order only.
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _fsdp2_check():
    """bench/fsdp2_check.py as a module its spawned ranks can import by name too."""
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("fsdp2_check")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp2_matches_single_process():
    """bench/fsdp2_check.py on two gloo ranks: fully_shard'ed tq layers ("int8_per_channel",
    "int4_per_group") train to the weights and fake-quant buffers of one process on the full
    batch. Eager backend: the spawned ranks would interpret every kernel (about 70 s), and
    the kernels have their own tests; this one is about sharding."""
    fsdp2 = _fsdp2_check()
    try:
        fsdp2.fully_shard_fn()
    except ImportError as err:
        pytest.skip(f"FSDP2 is not available: {err}")
    assert fsdp2.run("cpu", 2, 2, backend="eager") == []
