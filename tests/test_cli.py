"""The command line, `python -m triton_qat {env,check,autotune}`, on the CPU.

`check --quick --device cpu` runs the real kernels under the Triton interpreter in a child
process (it must set TRITON_INTERPRET itself, so the child starts without it); a broken
reference is injected in-process to see the failure reach the rows and the exit status.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest
import torch

import triton_qat as tq
from triton_qat.ops import functional as ops
from triton_qat.tools import check
from triton_qat.tools.check import common as check_common
from triton_qat.tools.check import run as check_run
from triton_qat.tools.cli import main

ROW_FIELDS = {
    "kind",
    "qconfig",
    "shape",
    "dtype",
    "metric",
    "result",
    "passed",
    "status",
    "tolerance",
    "mismatches",
    "max_abs_err",
    "rel_err",
    "sqnr_db",
    "error",
}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _cli(*args: str, interpret: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "triton_qat", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_env_prints_versions():
    proc = _cli("env")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in (tq.__version__, torch.__version__, platform.python_version()):
        assert expected in out
    for label in ("triton", "cuda", "backend", "interpreted", "cpu capability", "triton cache"):
        assert label in out
    assert "autotune cache" in out


def test_env_json_parses(tmp_path):
    env = dict(os.environ, TRITON_QAT_CACHE_DIR=str(tmp_path / "tuned"))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "triton_qat", "env", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["triton_qat"] == tq.__version__
    assert info["torch"] == torch.__version__
    assert info["python"] == platform.python_version()
    assert info["backend"] in ("auto", "triton", "eager")
    assert info["kernels_interpreted"] is False
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["autotune_cache_dir"] == str(tmp_path / "tuned")
    assert isinstance(info["cuda_devices"], list)


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    """One `check --quick --device cpu --json PATH` run: (process, seconds, JSON rows)."""
    path = tmp_path_factory.mktemp("check") / "check.json"
    start = time.monotonic()
    proc = _cli("check", "--quick", "--device", "cpu", "--json", str(path), timeout=300)
    elapsed = time.monotonic() - start
    rows = json.loads(path.read_text()) if path.exists() else None
    return proc, elapsed, rows


def test_check_quick_cpu_passes(quick_check):
    # Its run time (under a minute on 2 idle cores) is a figure for the README, not a test:
    # a timed assertion fails on a loaded machine and proves nothing on a fast one.
    proc, _, _ = quick_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("kind"))
    for column in ("qconfig", "shape", "dtype", "metric", "result", "status"):
        assert column in header
    rows = [line for line in lines if line.split()[:1] and line.split()[0] in check.KINDS]
    assert rows and all(line.rstrip().endswith("PASS") for line in rows)
    assert {line.split()[0] for line in rows} == set(check.KINDS)
    assert "all passed" in lines[-1]


def test_check_json_rows(quick_check):
    proc, _, rows = quick_check
    assert proc.returncode == 0
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) == ROW_FIELDS, row
        assert row["status"] == "PASS" and row["passed"] is True
        assert isinstance(row["shape"], list)
    by_kind = {kind: [r for r in rows if r["kind"] == kind] for kind in check.KINDS}
    fq = by_kind["fake_quant"]
    assert {r["metric"] for r in fq} == {"y", "dx"}
    assert all(r["result"] == "bit-exact" and r["mismatches"] == 0 for r in fq)
    assert {r["dtype"] for r in fq} == {"fp32", "fp16", "bf16"}
    labels = {r["qconfig"] for r in fq}
    for part in ("per_tensor", "axis=0", "axis=-1", "per_group(32)", "per_group(128)"):
        assert any(part in label for label in labels), part
    assert any("zp=float" in label for label in labels)
    assert by_kind["reference_vs_torch"]
    obs = by_kind["observer"]
    assert {r["metric"] for r in obs} == {"min", "max", "scale", "zp"}
    assert all(r["result"] == "bit-exact" and r["mismatches"] == 0 for r in obs)
    labels = {r["qconfig"] for r in obs}
    for part in ("fused ", "axis=0", "axis=-1", "PerGroup", " sym ", " affine "):
        assert any(part in label for label in labels), part
    lin = by_kind["fq_linear"]
    assert {r["metric"] for r in lin} == {"y", "dx", "dw", "db"}
    for r in lin:
        assert r["tolerance"] == check.LINEAR_TOLERANCE[getattr(torch, _DTYPE_ATTR[r["dtype"]])]
        assert 0 <= r["rel_err"] <= r["tolerance"]
        assert f"tol {r['tolerance']:.2e}" in r["result"]
    formats = by_kind["float_formats"]
    fq8 = [r for r in formats if len(r["shape"]) == 2]  # fake quant (x); linears are (M, N, K)
    assert fq8 and all(r["result"] == "bit-exact" for r in fq8)
    labels = {r["qconfig"] for r in formats}
    for part in ("e4m3fn per_tensor", "e5m2 per_row", "mxfp4 blocks of 32", "w nvfp4"):
        assert any(part in label for label in labels), part
    for r in formats:
        if r["tolerance"] is not None:
            assert 0 <= r["rel_err"] <= r["tolerance"]


_DTYPE_ATTR = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def test_broken_reference_fails_the_check(monkeypatch, tmp_path, capsys):
    """The eager forward off by one for a single case: that row fails, the rest pass, and the
    CLI returns 1."""
    real_eager = ops.fake_quantize_with_mask_eager

    def broken(x, nq, inv_scale=None):
        y, mask = real_eager(x, nq, inv_scale)
        target = (
            tuple(x.shape) == (7, 189)
            and x.dtype == torch.float32
            and nq.quant_min == -128
            and not nq.float_zero_point
        )
        return (y + 1 if target else y), mask

    monkeypatch.setattr(ops, "fake_quantize_with_mask_eager", broken)
    real_run = check.run_check
    # The fake-quant rows are the ones the broken reference reaches; skip the rest for time.
    monkeypatch.setattr(
        check,
        "run_check",
        lambda quick, device, **kw: real_run(quick, device, kinds=["fake_quant"], **kw),
    )
    path = tmp_path / "rows.json"
    code = main(["check", "--quick", "--device", "cpu", "--json", str(path)])
    assert code == 1
    rows = json.loads(path.read_text())
    failed = [r for r in rows if not r["passed"]]
    assert len(failed) == 1, failed
    (row,) = failed
    assert row["status"] == "FAIL"
    assert (row["qconfig"], row["dtype"], row["metric"]) == (
        "per_group(63) int8 zp=int",
        "fp32",
        "y",
    )
    assert row["mismatches"] > 0
    assert row["result"] == f"{row['mismatches']} of {7 * 189} elements differ"
    out = capsys.readouterr().out
    assert "1 FAILED" in out and "FAIL" in out


def test_case_error_is_a_failed_row(monkeypatch):
    def boom(case, seed=0):
        raise RuntimeError("injected\nsecond line")

    monkeypatch.setattr(check_run, "check_reference_vs_torch", boom)
    rows = check.run_check(True, "cpu", kinds=["reference_vs_torch"])
    assert rows and all(not r.passed for r in rows)
    assert all(r.error == "RuntimeError: injected" for r in rows)
    assert check.exit_code(rows) == 1


def test_one_gemm_config_is_restored():
    from triton_qat.kernels import fq_matmul

    tuners = (
        fq_matmul.fq_linear_fwd_kernel,
        fq_matmul.fq_linear_dx_kernel,
        fq_matmul.fq_linear_dw_kernel,
    )
    before = [t.configs for t in tuners]
    with check_common._one_gemm_config():
        assert all(len(t.configs) == 1 for t in tuners)
        assert all(t.configs[0] in b for t, b in zip(tuners, before, strict=True))
    assert all(t.configs is b for t, b in zip(tuners, before, strict=True))


@pytest.mark.parametrize(
    "interpret", [True, pytest.param(False, marks=NO_CUDA)], ids=["interpreted", "no-cuda"]
)
def test_autotune_without_cuda_exits_2(interpret):
    proc = _cli("autotune", interpret=interpret)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "autotune" in lines[0]


@NO_CUDA
def test_check_cuda_without_cuda_exits_2():
    proc = _cli("check", "--quick", "--device", "cuda")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_check_cpu_after_compiled_triton_import_exits_2():
    code = (
        "import sys, triton.language; from triton_qat.tools.cli import main; "
        "sys.exit(main(['check', '--quick', '--device', 'cpu']))"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TRITON_INTERPRET" in lines[0]


def test_env_shows_the_autotune_cache(tmp_path, monkeypatch, capsys):
    from triton_qat.kernels.autotune_cache import CACHE_FILE, AutotuneCache

    cache = AutotuneCache(tmp_path)
    for kernel in ("fq_linear_fwd_kernel", "fq_linear_dx_kernel"):
        config = {"kwargs": {"BLOCK_M": 64}, "num_warps": 4, "num_stages": 3}
        cache.store("NVIDIA H100", kernel, (64, 64, 64), config, 0.5)
    monkeypatch.setenv("TRITON_QAT_CACHE_DIR", str(tmp_path))
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("autotune cache"))
    assert str(tmp_path / CACHE_FILE) in line and "(2 entries" in line
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["autotune_cache_file"] == str(tmp_path / CACHE_FILE)
    assert info["autotune_cache_entries"] == 2


def test_autotune_model_without_compiled_cuda_exits_2(capsys):
    """In this process the kernels are interpreted (and CPU-only machines have no CUDA):
    exit 2 with one line, before the model is imported."""
    code = main(["autotune", "--model", "no_such_module:factory", "--no-cache"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "autotune" in lines[0] and "no_such_module" not in lines[0]


def test_autotune_jobs_from_model_and_shapes():
    from triton_qat.tools.cli import autotune_jobs, build_parser
    from triton_qat.tools.tuning import LinearShape

    parse = build_parser().parse_args
    args = parse(["autotune", "--model", "tests.test_tuning:build_block", "--batch-tokens", "512"])
    jobs = autotune_jobs(args)
    assert [(j.m, j.n, j.k, j.granularity) for j in jobs] == [
        (512, 96, 64, "per_channel"),
        (512, 64, 96, "per_group"),
    ]
    args = parse(["autotune", "--shapes", "64x32x256", "--granularity", "per_group"])
    assert autotune_jobs(args) == [
        LinearShape(64, 32, 256, "per_group", torch.bfloat16, group_size=128)
    ]
    with pytest.raises(SystemExit):
        parse(["autotune", "--shapes", "1x2x3", "--model", "m:f"])
    for bad in (["--batch-tokens", "64"], ["--model", "m:f", "--batch-tokens", "0"]):
        with pytest.raises(SystemExit):
            main(["autotune", *bad])
