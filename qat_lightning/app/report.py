"""Size / accuracy report of a Hydra sweep: ``python -m qat_lightning.report <multirun dir>``.

Collects the ``summary.json`` of every run under the directory (as written by
``python -m qat_lightning.train -m ...``) with the run's overrides (``.hydra/overrides.yaml``) into
``report.csv`` and draws ``report.png``: quantized test accuracy against true model size (log
scale), the Pareto frontier (no other run is both smaller and more accurate) highlighted, the
float baseline marked, each point labelled with the overrides that differ between runs.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SUMMARY = "summary.json"


@dataclass
class Run:
    """One run of a sweep: where it ran, its overrides and its summary."""

    path: Path
    overrides: list[str]
    summary: dict[str, Any]
    label: str = ""
    pareto: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> float:
        return float(self.summary["quantized_size_mb"])

    @property
    def accuracy(self) -> float:
        return float(self.summary["quantized_test_acc"])

    @property
    def is_float(self) -> bool:
        return float(self.summary.get("avg_bits", 0)) >= 32


def collect(root: str | Path, summary_file: str = SUMMARY) -> list[Run]:
    """Every run under ``root`` that wrote ``summary_file``, in job order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such sweep directory: {root}")
    runs = []
    for path in sorted(root.rglob(summary_file), key=_job_order):
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.exists() else []
        summary = json.loads(path.read_text())
        missing = {"quantized_size_mb", "quantized_test_acc"} - set(summary)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: not a summary written by qat_lightning.train")
        runs.append(Run(path.parent, overrides, summary))
    if not runs:
        raise FileNotFoundError(f"no {summary_file} under {root}: run a sweep first (python -m qat_lightning.train -m ...)")
    _label(runs)
    mark_pareto(runs)
    return runs


def _job_order(path: Path) -> tuple:
    parts = path.parent.relative_to(path.anchor).parts
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


PRESENTATION = ("hydra.", "progress_bar", "trainer.enable_progress_bar", "trainer.enable_model_summary", "logger")


def _label(runs: Sequence[Run]) -> None:
    """Label each run with the overrides that are not the same in every run (display-only
    settings such as the progress bar left out)."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    for i, run in enumerate(runs):
        varying = [_short(o) for o in run.overrides if o not in common and not o.lstrip("+~").startswith(PRESENTATION)]
        run.label = " ".join(varying) or f"run {i}"


def _short(override: str) -> str:
    key, _, value = override.partition("=")
    if not value:
        return override
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None and len(value) > 6:  # an Optuna-sampled float: 3 significant digits
        value = f"{number:.3g}"
    return f"{key.split('.')[-1]}={value}"


def mark_pareto(runs: Sequence[Run]) -> list[Run]:
    """Flag and return the runs no other run beats on both size (smaller) and accuracy (higher)."""
    frontier = []
    for run in runs:
        dominated = any(
            (o.size <= run.size and o.accuracy >= run.accuracy) and (o.size < run.size or o.accuracy > run.accuracy)
            for o in runs
        )
        run.pareto = not dominated
        if run.pareto:
            frontier.append(run)
    return sorted(frontier, key=lambda r: r.size)


def write_csv(runs: Sequence[Run], path: str | Path) -> Path:
    keys = sorted({k for r in runs for k, v in r.summary.items() if not isinstance(v, dict)})
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "label", "overrides", "pareto", *keys])
        for run in runs:
            writer.writerow([str(run.path), run.label, " ".join(run.overrides), run.pareto, *(run.summary.get(k, "") for k in keys)])
    return path


def float_baseline(runs: Sequence[Run]) -> tuple[float, float, str] | None:
    """(size MB, accuracy, description) of the float model: a float run of the sweep if there is
    one, else the median over runs of the trained model tested with its quantizers switched off."""
    floats = [r for r in runs if r.is_float]
    if floats:
        best = max(floats, key=lambda r: r.accuracy)
        return best.size, best.accuracy, "float32 run"
    values = sorted(float(r.summary["float_test_acc"]) for r in runs if "float_test_acc" in r.summary)
    sizes = [float(r.summary["float_size_mb"]) for r in runs if "float_size_mb" in r.summary]
    if not values or not sizes:
        return None
    return max(sizes), values[len(values) // 2], "float32 weights (median over runs, quantizers off)"


def plot(runs: Sequence[Run], path: str | Path, title: str | None = None) -> Path:
    """Accuracy (%) vs true size (MB, log scale); Pareto runs joined and highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantized = [r for r in runs if not r.is_float]
    frontier = sorted((r for r in runs if r.pareto), key=lambda r: r.size)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    others = [r for r in quantized if not r.pareto]
    ax.scatter([r.size for r in others], [100 * r.accuracy for r in others], s=36, color="#9aa5b1", label="run", zorder=2)
    ax.plot([r.size for r in frontier], [100 * r.accuracy for r in frontier], "-o", color="#d1495b", lw=2, ms=7,
            label="Pareto frontier", zorder=3)  # fmt: skip
    baseline = float_baseline(runs)
    if baseline is not None:
        size, accuracy, description = baseline
        ax.scatter([size], [100 * accuracy], marker="*", s=260, color="#00798c", label=description, zorder=4)
        ax.axhline(100 * accuracy, color="#00798c", lw=0.8, ls="--", zorder=1)
    for i, run in enumerate(sorted(quantized, key=lambda r: (r.size, r.accuracy))):  # neighbours: above / below
        ax.annotate(run.label, (run.size, 100 * run.accuracy), xytext=(6, 5 if i % 2 == 0 else -11), textcoords="offset points",
                    fontsize=7.5, color="#222222" if run.pareto else "#6b7785")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("true model size (MB, log scale)")
    ax.set_ylabel("quantized test accuracy (%)")
    sizes = [r.size for r in runs] + ([baseline[0]] if baseline else [])
    ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.6)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or f"Size vs accuracy, {len(runs)} runs")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_table(runs: Sequence[Run]) -> str:
    rows = [("run", "size MB", "compression", "avg bits", "acc %", "Pareto")]
    for run in sorted(runs, key=lambda r: r.size):
        s = run.summary
        rows.append((run.label, f"{run.size:.4f}", f"{s.get('compression', math.nan):.2f}x", f"{s.get('avg_bits', math.nan):.2f}",
                     f"{100 * run.accuracy:.2f}", "*" if run.pareto else ""))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (or any folder of runs with summary.json)")
    parser.add_argument("--out", default=None, help="folder for report.csv and report.png (default: the sweep dir)")
    parser.add_argument("--summary-file", default=SUMMARY)
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    runs = collect(args.sweep_dir, args.summary_file)
    out = Path(args.out or args.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(runs, out / "report.csv")
    png_path = plot(runs, out / "report.png", args.title)
    print(format_table(runs))
    print(f"{len(runs)} runs, {sum(r.pareto for r in runs)} on the Pareto frontier: {csv_path}, {png_path}")
    return runs


if __name__ == "__main__":
    main()
