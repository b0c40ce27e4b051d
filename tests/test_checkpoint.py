"""Checkpoints: save in the middle of QAT, reload in a NEW process, continue, and get bit for
bit the weights, observer buffers, qparams and optimizer state of the run that never stopped.

The resumed half runs in a subprocess (python tests/test_checkpoint.py DEVICE DIR), so
nothing carries over in memory: only what the state_dicts hold. The qconfigs cover the fused
moving-average observer ("x86", torch.ao's default), per-channel and per-group weights and a
dynamic per-token input ("w4a8_dynamic").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import triton_qat as tq

STEPS, SAVE_AT = 6, 3


def _model(qconfig: str) -> torch.nn.Module:
    torch.manual_seed(0)
    float_model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)
    )
    return tq.prepare_qat(float_model, qconfig)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of step `step`, whatever process asks for it."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 32, generator=g), torch.randn(8, 16, generator=g)


def _train(model, opt, steps: range, device: str) -> None:
    model.train()
    for step in steps:
        x, y = (t.to(device) for t in _batch(step))
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def _state(model, opt) -> dict:
    return {"model": model.state_dict(), "opt": opt.state_dict()}


def run(
    qconfig: str, backend: str, device: str, *, load: str | None, save: str, start: int, stop: int
) -> None:
    with tq.use_backend(backend):
        model = _model(qconfig).to(device)
        opt = _optimizer(model)
        if load:
            state = torch.load(load, map_location=device)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        _train(model, opt, range(start, stop), device)
        torch.save(_state(model, opt), save)


def _flatten(state: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out.update(_flatten(dict(enumerate(value)), name + "."))
        else:
            out[name] = value
    return out


def _assert_same(got: dict, want: dict) -> None:
    got, want = _flatten(got), _flatten(want)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype, key
            assert torch.equal(got[key].cpu(), value.cpu()), key
        else:
            assert got[key] == value, key


CASES = [("x86", "eager"), ("int4_per_group", "triton"), ("w4a8_dynamic", "auto")]


def _paths(tmp_path: Path, qconfig: str, backend: str) -> tuple[str, str, str]:
    return tuple(
        str(tmp_path / f"{qconfig}-{backend}-{n}.pt") for n in ("whole", "half", "resumed")
    )


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path, device):
    """One subprocess resumes every case (a new process pays seconds of imports)."""
    for qconfig, backend in CASES:
        whole, half, _ = _paths(tmp_path, qconfig, backend)
        run(qconfig, backend, str(device), load=None, save=whole, start=0, stop=STEPS)
        run(qconfig, backend, str(device), load=None, save=half, start=0, stop=SAVE_AT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    cmd = [sys.executable, __file__, str(device), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for qconfig, backend in CASES:
        whole, half, resumed = _paths(tmp_path, qconfig, backend)
        _assert_same(torch.load(resumed), torch.load(whole))
        # The half-way checkpoint really is half way: the resumed steps moved the weights.
        assert not torch.equal(
            torch.load(half)["model"]["0.weight"], torch.load(whole)["model"]["0.weight"]
        ), qconfig


if __name__ == "__main__":  # the resuming process: python test_checkpoint.py DEVICE DIR
    device, folder = sys.argv[1], Path(sys.argv[2])
    for qconfig, backend in CASES:
        _, half, resumed = _paths(folder, qconfig, backend)
        run(qconfig, backend, device, load=half, save=resumed, start=SAVE_AT, stop=STEPS)
