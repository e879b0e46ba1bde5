"""Size / accuracy report of a Hydra sweep: ``python -m qat_lightning.report <multirun dir>``.

Collects the ``summary.json`` of every run under the directory (as written by
``python -m qat_lightning.train -m ...``) with the run's overrides (``.hydra/overrides.yaml``) into
``report.csv`` and draws ``report.png``: the quantized test metric against true model size (log
scale), the Pareto frontier (no other run is both smaller and better) highlighted, the float
baseline marked, each point labelled with the overrides that differ between runs.

The metric is the summaries' ``test_metric`` (``test/acc`` by default): higher is better, except
for losses, bits per character and perplexities (``bpc``, ``loss``, ``nll``, ``ppl``, ``perplexity``,
``error`` in the name), where lower is (``--lower-is-better`` / ``--higher-is-better`` decide it
for any other name). Runs that differ only in ``seed=`` are one configuration: the report shows
their mean, with the spread (sample standard deviation) as an error bar and ``seeds`` / ``*_std``
columns in ``report.csv`` (``--per-seed``: every run its own point).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SUMMARY = "summary.json"
LOWER_IS_BETTER = ("bpc", "loss", "nll", "ppl", "perplexity", "error")
SEED = "seed="


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
        """The quantized test metric (accuracy, or bpc / a loss: see :func:`lower_is_better`)."""
        return float(self.summary["quantized_test_acc"])

    @property
    def seeds(self) -> int:
        """How many runs (seeds) this point is the mean of."""
        return int(self.extra.get("seeds", 1))

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
    metrics = {r.summary.get("test_metric", "test/acc") for r in runs}
    if len(metrics) > 1:
        raise ValueError(f"the runs under {root} report different test metrics {sorted(metrics)}: one report per metric")
    _label(runs)
    mark_pareto(runs, lower_is_better(runs))
    return runs


def metric_name(runs: Sequence[Run]) -> str:
    return str(runs[0].summary.get("test_metric", "test/acc")) if runs else "test/acc"


def lower_is_better(runs: Sequence[Run]) -> bool:
    """Whether a smaller metric is better: bits per character, losses, perplexities (by name)."""
    name = metric_name(runs).lower()
    return any(word in name for word in LOWER_IS_BETTER)


def _lower(runs: Sequence[Run], lower: bool | None) -> bool:
    """``lower`` if given, else the metric's own direction (:func:`lower_is_better`)."""
    return lower_is_better(runs) if lower is None else lower


def merge_seeds(runs: Sequence[Run], lower: bool | None = None) -> list[Run]:
    """One run per configuration: runs whose overrides differ only in ``seed=`` become their mean
    (every numeric summary entry averaged; ``extra``: ``seeds`` and the sample standard deviation of
    size and metric), labelled and Pareto-marked again. A configuration run once stays as it is."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        key = tuple(o for o in run.overrides if not o.startswith(SEED))
        groups.setdefault(key, []).append(run)
    merged = []
    for key, members in groups.items():
        seeds = [o.partition("=")[2] for m in members for o in m.overrides if o.startswith(SEED)]
        if len(members) == 1:
            run = members[0]
            merged.append(Run(run.path, list(key), run.summary, extra={**run.extra, "seed_values": " ".join(seeds)}))
            continue
        numeric = [k for k, v in members[0].summary.items() if _is_number(v) and all(_is_number(m.summary.get(k)) for m in members)]
        summary = {**members[0].summary, **{k: statistics.fmean(float(m.summary[k]) for m in members) for k in numeric}}
        extra = dict(seeds=len(members), seed_values=" ".join(seeds),
                     quantized_test_acc_std=statistics.stdev(m.accuracy for m in members),
                     quantized_size_mb_std=statistics.stdev(m.size for m in members))  # fmt: skip
        merged.append(Run(Path(os.path.commonpath([str(m.path) for m in members])), list(key), summary, extra=extra))
    _label(merged)
    mark_pareto(merged, _lower(merged, lower))
    return merged


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    if key == "experiment":  # a recipe: its name says it
        return value
    return f"{key.split('.')[-1]}={value}"


def mark_pareto(runs: Sequence[Run], lower: bool = False) -> list[Run]:
    """Flag and return the runs no other run beats on both size (smaller) and the metric (higher;
    ``lower``: smaller, as bits per character)."""
    sign = -1.0 if lower else 1.0
    frontier = []
    for run in runs:
        dominated = any(
            (o.size <= run.size and sign * o.accuracy >= sign * run.accuracy)
            and (o.size < run.size or sign * o.accuracy > sign * run.accuracy)
            for o in runs
        )
        run.pareto = not dominated
        if run.pareto:
            frontier.append(run)
    return sorted(frontier, key=lambda r: r.size)


def write_csv(runs: Sequence[Run], path: str | Path) -> Path:
    keys = sorted({k for r in runs for k, v in r.summary.items() if not isinstance(v, dict)})
    extra = ["seeds", "seed_values", "quantized_test_acc_std", "quantized_size_mb_std"] if any(r.seeds > 1 for r in runs) else []
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "label", "overrides", "pareto", *extra, *keys])
        for run in runs:
            writer.writerow([str(run.path), run.label, " ".join(run.overrides), run.pareto,
                             *(run.extra.get(k, 1 if k == "seeds" else "") for k in extra), *(run.summary.get(k, "") for k in keys)])  # fmt: skip
    return path


def float_baseline(runs: Sequence[Run], lower: bool | None = None) -> tuple[float, float, str] | None:
    """(size MB, accuracy, description) of the float model: a float run of the sweep if there is
    one, else the median over runs of the trained model tested with its quantizers switched off."""
    floats = [r for r in runs if r.is_float]
    if floats:
        best = (min if _lower(runs, lower) else max)(floats, key=lambda r: r.accuracy)
        return best.size, best.accuracy, "float32 run" + (f" (mean of {best.seeds} seeds)" if best.seeds > 1 else "")
    values = sorted(float(r.summary["float_test_acc"]) for r in runs if "float_test_acc" in r.summary)
    sizes = [float(r.summary["float_size_mb"]) for r in runs if "float_size_mb" in r.summary]
    if not values or not sizes:
        return None
    return max(sizes), values[len(values) // 2], "float32 weights (median over runs, quantizers off)"


def _scale(runs: Sequence[Run], lower: bool) -> tuple[float, str]:
    """How the metric is shown: accuracy in %, anything else as it is."""
    name = metric_name(runs)
    if name.endswith("acc"):
        return 100.0, f"quantized {name} (%)"
    return 1.0, f"quantized {name} ({'lower' if lower else 'higher'} is better)"


def plot(runs: Sequence[Run], path: str | Path, title: str | None = None, lower: bool | None = None) -> Path:
    """The metric vs true size (MB, log scale); Pareto runs joined and highlighted; a point that is
    the mean of several seeds carries their spread as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lower = _lower(runs, lower)
    scale, ylabel = _scale(runs, lower)
    quantized = [r for r in runs if not r.is_float]
    frontier = sorted((r for r in runs if r.pareto and not r.is_float), key=lambda r: r.size)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    others = [r for r in quantized if not r.pareto]
    ax.scatter([r.size for r in others], [scale * r.accuracy for r in others], s=36, color="#9aa5b1", label="run", zorder=2)
    ax.plot([r.size for r in frontier], [scale * r.accuracy for r in frontier], "-o", color="#d1495b", lw=2, ms=7,
            label="Pareto frontier", zorder=3)  # fmt: skip
    spread = [r for r in quantized if r.seeds > 1]
    if spread:
        ax.errorbar([r.size for r in spread], [scale * r.accuracy for r in spread],
                    yerr=[scale * r.extra["quantized_test_acc_std"] for r in spread], fmt="none", ecolor="#6b7785",
                    elinewidth=1, capsize=3, zorder=2, label=f"spread over seeds (std; {_count(r.seeds for r in spread)} seeds)")  # fmt: skip
    baseline = float_baseline(runs, lower)
    if baseline is not None:
        size, accuracy, description = baseline
        ax.scatter([size], [scale * accuracy], marker="*", s=260, color="#00798c", label=description, zorder=4)
        ax.axhline(scale * accuracy, color="#00798c", lw=0.8, ls="--", zorder=1)
    ax.set_xscale("log")
    ax.autoscale_view()
    _labels(ax, quantized, scale)
    ax.set_xlabel("true model size (MB, log scale)")
    ax.set_ylabel(ylabel)
    sizes = [r.size for r in runs] + ([baseline[0]] if baseline else [])
    ax.set_xlim(min(sizes) / 1.3, max(sizes) * 1.6)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or f"Size vs {metric_name(runs)}, {len(runs)} configurations")
    ax.legend(loc="upper right" if lower else "lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _count(values: Any) -> str:
    values = sorted(values)
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


def _labels(ax: Any, runs: Sequence[Run], scale: float) -> None:
    """Each point's label to its right; labels of points close in size are spread apart vertically
    (at least a line apart, in the order of their points) and joined to their point by a thin line."""
    if not runs:
        return
    low, high = ax.get_ylim()
    gap = (high - low) * 0.04  # one label line, in data units
    placed: list[tuple[float, float]] = []  # (log size, label y) of the labels so far
    for run in sorted(runs, key=lambda r: (scale * r.accuracy, r.size)):  # bottom to top
        x, y = math.log10(run.size), scale * run.accuracy
        near = [ly for lx, ly in placed if abs(lx - x) < 0.12]
        label_y = max([y, *(ly + gap for ly in near)])
        placed.append((x, label_y))
        moved = label_y - y > gap / 4
        ax.annotate(run.label, (run.size, y), xytext=(run.size * 1.06, label_y), textcoords="data", fontsize=7.5, va="center",
                    color="#222222" if run.pareto else "#6b7785",
                    arrowprops=dict(arrowstyle="-", color="#b0b8c1", lw=0.6) if moved else None)  # fmt: skip


def format_table(runs: Sequence[Run]) -> str:
    scale, _ = _scale(runs, lower_is_better(runs))
    unit = "%" if scale == 100 else ""
    name = metric_name(runs).split("/")[-1]
    seeds = any(r.seeds > 1 for r in runs)
    # bits per weight as stored (scales and widths included) where the summary has it: the same measure for every method
    rows = [("run", "size MB", "compression", "bits/weight", f"{name} {unit}".strip(), *(("± std", "seeds") if seeds else ()), "Pareto")]
    digits = 2 if scale == 100 else 4
    for run in sorted(runs, key=lambda r: r.size):
        s = run.summary
        spread = (f"{scale * run.extra['quantized_test_acc_std']:.{digits}f}" if run.seeds > 1 else "", str(run.seeds)) if seeds else ()
        rows.append((run.label, f"{run.size:.4f}", f"{s.get('compression', math.nan):.2f}x", f"{s.get('stored_bits', s.get('avg_bits', math.nan)):.2f}",
                     f"{scale * run.accuracy:.{digits}f}", *spread, "*" if run.pareto else ""))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (or any folder of runs with summary.json)")
    parser.add_argument("--out", default=None, help="folder for report.csv and report.png (default: the sweep dir)")
    parser.add_argument("--summary-file", default=SUMMARY)
    parser.add_argument("--title", default=None)
    parser.add_argument("--per-seed", action="store_true", help="every run its own point (default: the mean over seeds)")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--lower-is-better", dest="lower", action="store_true", default=None,
                           help="a smaller metric is better (default: by the metric's name)")
    direction.add_argument("--higher-is-better", dest="lower", action="store_false")
    args = parser.parse_args(argv)
    runs = collect(args.sweep_dir, args.summary_file)
    lower = _lower(runs, args.lower)
    if args.per_seed:
        mark_pareto(runs, lower)  # collect() marked them in the metric's own direction
    else:
        runs = merge_seeds(runs, lower)
    out = Path(args.out or args.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(runs, out / "report.csv")
    png_path = plot(runs, out / "report.png", args.title, lower)
    print(format_table(runs))
    better = "lower" if lower else "higher"
    print(f"{len(runs)} configurations, {sum(r.pareto for r in runs)} on the Pareto frontier ({metric_name(runs)}: {better} is "
          f"better): {csv_path}, {png_path}")  # fmt: skip
    return runs


if __name__ == "__main__":
    main()
