"""Render the benchmark records under a results folder: a markdown summary and plots.

    python bench/report.py [--results bench/results] [--markdown PATH]

Reads every JSON list of benchmark records below --results (`linear.json` from
bench_linear.py, `fake_quant.json` from bench_fake_quant.py, in any sub-folder; other JSON
is ignored, unreadable files are listed). Where a card has several runs of the same row, the
latest (`date`) counts. Writes:
- the markdown summary, --markdown (default RESULTS/README.md): per card, the fused linear's
  median ms per provider with its ratio to torch_linear of the same bench and shape, then the
  fake-quant ms with the percentage of the card's copy bandwidth;
- RESULTS/<card>/linear.png: time and TFLOP/s per provider and shape, one column per bench.
  It needs matplotlib (the `plot` extra); without it the plot is skipped with one message.
Needs neither a GPU nor torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from _gpu_run import card_slug

FLOOR = "torch_linear"
LINEAR_BENCHES = ("linear_fwd", "linear_fwd_bwd")
FAKE_QUANT_BENCHES = ("fake_quant_fwd", "fake_quant_fwd_bwd")
PROVIDER_ORDER = (
    "torch_linear",
    "torch_ao_qat",
    "eager_compiled",
    "triton_qat",
    "triton_qat_fp32_master",
    "torch",
    "torch_copy",
)


def _is_record(r: object) -> bool:
    return isinstance(r, dict) and {"bench", "provider", "shape", "gpu"} <= r.keys()


def load_records(results: Path) -> tuple[list[dict], list[str]]:
    """Every benchmark record below `results`, the latest run of each row per card, and the
    JSON files that could not be read. Valid JSON that is not a list of records is ignored."""
    latest: dict[tuple, dict] = {}
    skipped = []
    for path in sorted(results.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            skipped.append(f"{path.relative_to(results)}: {type(e).__name__}")
            continue
        if not isinstance(data, list) or not data or not all(_is_record(r) for r in data):
            continue  # another tool's JSON (check.json, ...)
        for r in data:
            row = (
                r["gpu"],
                r["bench"],
                r.get("qconfig"),
                tuple(r["shape"]),
                r.get("dtype"),
                r["provider"],
            )
            if row not in latest or str(r.get("date", "")) >= str(latest[row].get("date", "")):
                latest[row] = r
    return list(latest.values()), skipped


def _providers(records: list[dict]) -> list[str]:
    names = {r["provider"] for r in records}
    known = [p for p in PROVIDER_ORDER if p in names]
    return known + sorted(names - set(known))


def _shape(r: dict) -> str:
    return "x".join(str(s) for s in r["shape"])


def _ms(r: dict | None) -> float | None:
    ms = None if r is None else r.get("ms")
    return ms if isinstance(ms, (int, float)) and ms > 0 else None


def with_ratios(records: list[dict]) -> list[dict]:
    """Linear records with `ratio` = ms / torch_linear's ms for the same card, bench, shape
    and dtype (None without a floor), computed here rather than trusted from the file."""
    floor = {
        (r["gpu"], r["bench"], tuple(r["shape"]), r.get("dtype")): _ms(r)
        for r in records
        if r["provider"] == FLOOR
    }
    out = []
    for r in records:
        if r["bench"] not in LINEAR_BENCHES:
            continue
        ref = floor.get((r["gpu"], r["bench"], tuple(r["shape"]), r.get("dtype")))
        ms = _ms(r)
        out.append({**r, "ratio": ms / ref if ms and ref else None})
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _row_order(r: dict) -> tuple:
    return (r["bench"], str(r.get("qconfig")), -r["shape"][0], _shape(r), str(r.get("dtype")))


def _provider_table(rows: list[dict], shape_label: str, extra) -> list[str]:
    """Markdown: one row per (bench, qconfig, shape, dtype), one column per provider holding
    `ms` and, in parentheses, `extra(record)` when it returns text."""
    providers = _providers(rows)
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in sorted(rows, key=_row_order):
        cells[(r["bench"], str(r.get("qconfig")), _shape(r), str(r.get("dtype")))][
            r["provider"]
        ] = r
    body = []
    for labels, by_provider in cells.items():
        row = list(labels)
        for p in providers:
            r = by_provider.get(p)
            if r is None:
                row.append("")
            elif _ms(r) is None:
                row.append("failed")
            else:
                note = extra(r)
                row.append(f"{_ms(r):.3f}" + (f" ({note})" if note else ""))
        body.append(row)
    return _table(["bench", "qconfig", shape_label, "dtype", *providers], body)


def linear_table(records: list[dict]) -> list[str]:
    """Markdown rows: bench, qconfig, shape, dtype, then `ms (ratio x)` per provider."""
    return _provider_table(
        with_ratios(records), "M x N x K", lambda r: r["ratio"] and f"{r['ratio']:.2f}x"
    )


def fake_quant_table(records: list[dict]) -> list[str]:
    """Markdown rows: bench, qconfig, shape, dtype, then `ms (% copy bandwidth)` per provider."""
    rows = [r for r in records if r["bench"] in FAKE_QUANT_BENCHES]
    return _provider_table(
        rows, "shape", lambda r: r.get("pct_copy_bw") and f"{r['pct_copy_bw']:.0f} %"
    )


def render_markdown(records: list[dict], plots: dict[str, str], skipped: list[str]) -> str:
    """The summary: one section per card (`plots`: card -> plot path relative to the file)."""
    lines = [
        "# Benchmark results",
        "",
        "Rendered by `python bench/report.py` from the JSON records below this folder "
        "(the latest run of each row per card). Linear cells: median ms of one call, in "
        "parentheses its ratio to `torch_linear` (plain bf16 F.linear) for the same bench and "
        "shape; > 1 is slower. Fake-quant cells: median ms, in parentheses the percentage of "
        "the card's copy bandwidth. Compare times only within one card.",
    ]
    if not records:
        lines += ["", "No benchmark records found."]
    by_gpu: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_gpu[r["gpu"]].append(r)
    for gpu in sorted(by_gpu):
        recs = by_gpu[gpu]
        versions = sorted(
            {f"torch {r['torch']}, triton {r['triton']}" for r in recs if r.get("torch")}
        )
        dates = sorted(str(r.get("date")) for r in recs)
        lines += ["", f"## {gpu}", "", f"{'; '.join(versions)}; runs {dates[0]} .. {dates[-1]}"]
        if any(r["bench"] in LINEAR_BENCHES for r in recs):
            lines += ["", "### Fused fake-quant linear: ms (x torch_linear)", ""]
            lines += linear_table(recs)
            if gpu in plots:
                lines += ["", f"![{gpu}: time and TFLOP/s]({plots[gpu]})"]
        if any(r["bench"] in FAKE_QUANT_BENCHES for r in recs):
            lines += ["", "### Fake quant alone: ms (% of copy bandwidth)", ""]
            lines += fake_quant_table(recs)
    if skipped:
        lines += ["", "Unreadable files passed over: " + "; ".join(f"`{s}`" for s in skipped)]
    return "\n".join(lines) + "\n"


def plot_linear(records: list[dict], path: Path) -> bool:
    """Time and TFLOP/s per provider and (shape, qconfig), one column per bench, into `path`
    (one card's records). False, after one message, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib not installed (pip install '.[plot]'); plots skipped")
        return False
    rows = [r for r in records if r["bench"] in LINEAR_BENCHES]
    benches = [b for b in LINEAR_BENCHES if any(r["bench"] == b for r in rows)]
    providers = _providers(rows)
    fig, axes = plt.subplots(
        2, len(benches), figsize=(7 * len(benches), 8), squeeze=False, constrained_layout=True
    )
    width = 0.8 / max(len(providers), 1)
    for col, bench in enumerate(benches):
        recs = sorted((r for r in rows if r["bench"] == bench), key=_row_order)
        by_cell = {(r["provider"], f"{_shape(r)}\n{r.get('qconfig')}"): r for r in recs}
        groups = list(dict.fromkeys(group for _, group in by_cell))
        for row, (field, label) in enumerate((("ms", "ms"), ("tflops", "TFLOP/s"))):
            ax = axes[row][col]
            for i, p in enumerate(providers):
                # Failed rows (no time) get no bar; a provider keeps its colour everywhere.
                present = [j for j, g in enumerate(groups) if by_cell.get((p, g), {}).get(field)]
                if not present:
                    continue
                offset = (i - (len(providers) - 1) / 2) * width
                values = [by_cell[(p, groups[j])][field] for j in present]
                ax.bar([j + offset for j in present], values, width, label=p, color=f"C{i % 10}")
            ax.set_xticks(range(len(groups)), groups, fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{bench}: {label}" + (" (lower is better)" if field == "ms" else ""))
        axes[0][col].legend(fontsize=7)
    fig.suptitle(records[0]["gpu"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(results: Path, markdown: Path | None = None) -> Path:
    """Read the records below `results`, draw each card's plot, write the markdown; returns
    the markdown's path."""
    markdown = markdown or results / "README.md"
    records, skipped = load_records(results)
    plots: dict[str, str] = {}
    by_gpu: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_gpu[r["gpu"]].append(r)
    for gpu, recs in sorted(by_gpu.items()):
        if not any(r["bench"] in LINEAR_BENCHES for r in recs):
            continue
        png = results / card_slug(gpu) / "linear.png"
        if not plot_linear(recs, png):
            break  # one message, not one per card
        plots[gpu] = Path(os.path.relpath(png, markdown.parent)).as_posix()
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(render_markdown(records, plots, skipped))
    print(f"report: {len(records)} records from {results} -> {markdown}")
    return markdown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument("--markdown", type=Path, default=None, help="default RESULTS/README.md")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        print(f"report: no folder {args.results}", file=sys.stderr)
        return 2
    render(args.results, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
