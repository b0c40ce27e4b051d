"""bench/report.py on records written to a temporary folder, and bench/run_all.py's exit
status without a GPU. No GPU needed."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module


def _linear(provider, ms, *, bench="linear_fwd_bwd", shape=(8192, 4096, 4096), date="2026-11-02"):
    m, n, k = shape
    return {
        "bench": bench,
        "shape": list(shape),
        "dtype": "bfloat16",
        "qconfig": "int8_per_channel",
        "provider": provider,
        "ms": ms,
        "tflops": None if ms is None else 6 * m * n * k / ms / 1e9,
        "gpu": H100,
        "torch": "2.13.0",
        "triton": "3.9.0",
        "date": date,
    }


@pytest.fixture
def results(tmp_path):
    card = tmp_path / "nvidia-h100-80gb-hbm3"
    card.mkdir()
    records = [
        _linear("torch_linear", 2.0),
        _linear("triton_qat", 3.0),
        _linear("eager_compiled", None),
        _linear("torch_linear", 0.5, shape=(1024, 4096, 4096)),
        _linear("triton_qat", 0.6, shape=(1024, 4096, 4096)),
        _linear("torch_linear", 1.0, bench="linear_fwd"),
        _linear("triton_qat", 1.25, bench="linear_fwd"),
    ]
    (card / "linear.json").write_text(json.dumps(records))
    # An older run of the same card: superseded row by row by the newer one.
    old = card / "2026-10-01-abc1234"
    old.mkdir()
    stale = [_linear("triton_qat", 9.0, date="2026-10-01"), _linear("torch_ao_qat", 4.0)]
    (old / "linear.json").write_text(json.dumps(stale))
    fq = {
        "bench": "fake_quant_fwd",
        "shape": [4096, 4096],
        "dtype": "bfloat16",
        "qconfig": "int8_per_tensor",
        "provider": "triton_qat",
        "ms": 0.05,
        "pct_copy_bw": 91.4,
        "gpu": H100,
        "date": "2026-11-02",
    }
    (card / "fake_quant.json").write_text(json.dumps([fq]))
    (card / "check.json").write_text(json.dumps([{"kind": "fake_quant", "passed": True}]))
    (card / "broken.json").write_text("[{")
    return tmp_path


def _table_rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n\n", 2)[1]
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("|")
    ]


def test_report_markdown(results, bench_module, monkeypatch, capsys):
    report = bench_module("report")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plot extra not installed
    path = report.render(results)
    out = capsys.readouterr().out
    assert path == results / "README.md"
    assert out.count("matplotlib not installed") == 1
    assert not list(results.rglob("*.png"))
    text = path.read_text()
    assert f"## {H100}" in text and "![" not in text
    header, _sep, *rows = _table_rows(text, "ms (x torch_linear)")
    assert header == [
        "bench",
        "qconfig",
        "M x N x K",
        "dtype",
        "torch_linear",
        "torch_ao_qat",
        "eager_compiled",
        "triton_qat",
    ]
    cells = {(r[0], r[2]): dict(zip(header[4:], r[4:], strict=True)) for r in rows}
    big = cells[("linear_fwd_bwd", "8192x4096x4096")]
    assert big == {
        "torch_linear": "2.000 (1.00x)",
        "torch_ao_qat": "4.000 (2.00x)",
        "eager_compiled": "failed",
        "triton_qat": "3.000 (1.50x)",
    }
    assert cells[("linear_fwd_bwd", "1024x4096x4096")]["triton_qat"] == "0.600 (1.20x)"
    assert cells[("linear_fwd", "8192x4096x4096")]["triton_qat"] == "1.250 (1.25x)"
    fq_rows = _table_rows(text, "(% of copy bandwidth)")
    assert fq_rows[2][:4] == ["fake_quant_fwd", "int8_per_tensor", "4096x4096", "bfloat16"]
    assert fq_rows[2][4] == "0.050 (91 %)"
    assert "`nvidia-h100-80gb-hbm3/broken.json: JSONDecodeError`" in text
    assert "check.json" not in text  # another tool's JSON: ignored


def test_report_plot(results, bench_module):
    pytest.importorskip("matplotlib")
    report = bench_module("report")
    text = report.render(results, results / "summary" / "README.md").read_text()
    png = results / "nvidia-h100-80gb-hbm3" / "linear.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](../nvidia-h100-80gb-hbm3/linear.png)" in text


def test_report_without_records(tmp_path, bench_module):
    text = bench_module("report").render(tmp_path).read_text()
    assert "No benchmark records found." in text


def test_run_all_without_a_gpu_exits_2(bench_module, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_module("run_all").main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_all:")
    assert not list(tmp_path.iterdir())
