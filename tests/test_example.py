"""The README's main job, examples/qat_tiny_lm.py, end to end at a tiny size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qat_tiny_lm.py"
TINY = [
    "--steps", "6",
    "--qat-steps", "4",
    "--d-model", "32",
    "--layers", "1",
    "--heads", "2",
    "--seq-len", "16",
    "--batch-size", "4",
    "--calib-batches", "2",
    "--eval-tokens", "256",
    "--log-every", "2",
]  # fmt: skip


def test_qat_tiny_lm_runs_and_reports() -> None:
    # conftest.py sets TRITON_INTERPRET for the kernel tests; the example's default CPU run
    # takes the eager path, which is what this checks.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["TRITON_QAT_BACKEND"] = "auto"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *TINY],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for needle in (
        "[float] step     2/6  train loss",  # progress lines
        "[QAT] step     4/4",
        "| variant",  # the table
        "| float ",
        "| PTQ w4a8_dynamic ",
        "| QAT w4a8_dynamic ",
        "| QAT, converted ",
        "PTQ lost ",
        "tq.convert: val ppl ",
        ": equal (",
        "Linear weights: ",
    ):
        assert needle in out, f"{needle!r} missing from the output:\n{out}"
    assert "eager (auto)" in out


HF_EXAMPLE = EXAMPLE.parent / "hf_llama_qat.py"
HF_TINY = [
    "--steps", "6",
    "--qat-steps", "4",
    "--hidden", "32",
    "--intermediate", "64",
    "--layers", "1",
    "--heads", "2",
    "--seq-len", "16",
    "--batch-size", "4",
    "--calib-batches", "2",
    "--eval-tokens", "256",
    "--generate", "20",
]  # fmt: skip


def test_hf_llama_qat_runs_and_reports(tmp_path) -> None:
    import pytest

    for module in ("transformers", "compressed_tensors", "safetensors"):
        pytest.importorskip(module)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",)}
    env["TRITON_QAT_BACKEND"] = "auto"
    proc = subprocess.run(
        [sys.executable, str(HF_EXAMPLE), *HF_TINY, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for needle in (
        "recipe: {'lm_head': None, 'model.embed_tokens': 'embedding_int8'",
        "| QAT, converted ",
        "| converted, reloaded ",
        "| compressed-tensors, from_pretrained ",
        ": equal; served by transformers",
        "x the float model's",
        "The for statement",
    ):
        assert needle in out, f"{needle!r} missing from the output:\n{out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed-tensors", "triton_qat"]
