"""The GPU reliability scripts of bench/ at toy sizes on the CPU, so they cannot rot between
GPU runs: bench/scale_check.py (tensors past 2**31 elements) and the verdict of
bench/stability.py (fused vs eager loss curves)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_scale_check_runs_and_compares(device, capsys, monkeypatch):
    # main() pins TRITON_QAT_AUTOTUNE=0 for its own process; keep that out of later tests.
    monkeypatch.setenv("TRITON_QAT_AUTOTUNE", "0")
    scale_check = _load("scale_check")
    argv = ["--device", str(device), "--fq-shape", "70", "33", "--linear", "70", "17", "40"]
    assert scale_check.main([*argv, "--rows", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == 7 and "FAIL" not in out


def test_scale_check_places_cover_element_2_31():
    places = _load("scale_check")._places(total_rows=70_000, row_elems=32_768, rows=64)
    assert places[0] == 0 and places[-1] == 70_000 - 64
    row_2_31 = 2**31 // 32_768
    assert any(p <= row_2_31 < p + 64 for p in places)


def _curve(seed: int, n: int, shift: float = 0.0) -> list[float]:
    rng = random.Random(seed)
    return [3.0 * 0.999**i + 0.05 * rng.gauss(0, 1) + shift for i in range(n)]


@pytest.mark.parametrize("shift,ok", [(0.0, True), (0.05, False)])
def test_stability_verdict(shift, ok):
    """Two noisy runs of one decaying curve agree; one shifted by one sigma of the noise (over
    windows of 100 steps: 7 standard errors of the difference of means) does not."""
    verdict = _load("stability").compare(_curve(1, 2000), _curve(2, 2000, shift), 100)
    assert len(verdict["windows"]) == 20
    assert verdict["ok"] is ok


def test_stability_script_end_to_end_on_the_interpreter(tmp_path):
    """bench/stability.py on a CPU: a tiny model through both paths (the fused one under the
    interpreter with its 128x128x64 tiles), the JSON record with both curves and a verdict.
    About 30 s."""
    import json
    import os
    import subprocess

    args = ["--steps", "20", "--pretrain-steps", "5", "--d-model", "32", "--layers", "1"]
    args += ["--heads", "2", "--seq-len", "16", "--batch-size", "8", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_QAT_INTERPRETER_TILE"}
    done = subprocess.run(
        [sys.executable, str(BENCH / "stability.py"), *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    # 0: the curves agree, 1: they differ beyond the noise; either way a verdict is printed
    assert done.returncode in (0, 1) and "stability: 2 windows" in done.stdout, (
        done.stdout + done.stderr
    )
    record = json.loads((tmp_path / "stability.json").read_text())
    assert record["interpreted"] and record["interpreter_tile"] == "128x128x64"
    assert len(record["eager"]) == len(record["fused"]) == 20
    # the same initial weights and batches: the first step's losses agree to float rounding
    assert abs(record["eager"][0] - record["fused"][0]) < 1e-4 * abs(record["eager"][0])
    assert record["verdict"]["ok"] == (done.returncode == 0)
