"""bench/compile_check.py: one small kernel variant compiled for sm_90 without a GPU.

The script needs Triton's compiled path, so it runs in a subprocess without TRITON_INTERPRET
(this test session interprets kernels). About 6 s on an idle core.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_check.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )


def test_one_variant_compiles_to_a_cubin_and_every_kernel_is_listed(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler")
    out = tmp_path / "result.json"
    done = _run(
        "--quick", "--arch", "90", "--kernels", "fake_quant_fwd", "--limit", "1", "--json", str(out)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 ok, 0 failed" in done.stdout
    assert "missing from KERNELS" not in done.stdout  # every kernel has its variants listed
    (result,) = json.loads(out.read_text())["results"]
    assert result["ok"] and result["kernel"] == "fake_quant_fwd"
    assert result["cubin_bytes"] > 0


def test_gemm_machine_code_stats(tmp_path):
    """A fused GEMM compiled with --aligned: registers, spills and its hot loop's MMAs read off
    the SASS (the wheel's cuobjdump / nvdisasm). About 10 s."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.nvidia import compiler as nvidia

    tools = Path(nvidia.__file__).parent / "bin"
    if not (tools / "cuobjdump").exists() or not (tools / "nvdisasm").exists():
        pytest.skip("this triton wheel has no cuobjdump / nvdisasm")
    out = tmp_path / "result.json"
    where = ["dtype=bf16", "w=bf16", "W_GRAN=1", "W_CODES=True", "X_QUANT=(False, False)"]
    done = _run(
        "--arch", "90", "--kernels", "fq_linear_fwd", "--aligned", "--limit", "1",
        "--json", str(out), "--where", *where,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert result["variant"]["W_CODES"] is True
    assert 0 < result["registers"] <= 255
    assert result["spill_bytes"] >= 0
    # sm_90: the K loop issues warpgroup MMAs among its other instructions
    assert 0 < result["loop_mma"] < result["loop_instructions"]
    # the loop's int -> float conversions are counted (the codes' I2F, see bench/README.md)
    assert 0 <= result["loop_i2f"] < result["loop_instructions"]
    assert "regs=" in done.stdout and "loop=" in done.stdout
