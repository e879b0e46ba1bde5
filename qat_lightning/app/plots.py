"""Pictures of a quantized model: bits per layer and each layer's share of the size."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def format_layer_table(stats: Sequence[dict[str, Any]]) -> str:
    """A text table of :meth:`DiffQuantizer.layer_stats`: bits (mean ± std, range), size, share."""
    rows = [("layer", "shape", "bits mean", "± std", "min-max", "size MB", "share")]
    for s in stats:
        rows.append((s["name"], "x".join(map(str, s["shape"])), f"{s['bits_mean']:.2f}", f"{s['bits_std']:.2f}",
                     f"{s['bits_min']:.0f}-{s['bits_max']:.0f}", f"{s['size_mb']:.4f}", f"{100 * s['share']:.1f} %"))  # fmt: skip
    total = sum(s["size_mb"] for s in stats)
    rows.append(("total", "", "", "", "", f"{total:.4f}", "100.0 %"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    rule = "-" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])


def plot_layer_bits(stats: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Two panels, one row per tensor: bits (mean, ± std bar, min-max whiskers) and share of the
    model size. Unquantized tensors are drawn in grey at 32 (or 16) bits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in stats]
    y = list(range(len(stats)))
    height = max(2.6, 0.42 * len(stats) + 1.4)
    fig, (bits_ax, share_ax) = plt.subplots(1, 2, figsize=(10, height), dpi=120, sharey=True,
                                            gridspec_kw={"width_ratios": [3, 2]})  # fmt: skip
    colors = ["#d1495b" if s["quantized"] else "#9aa5b1" for s in stats]
    top = max([s["bits_max"] for s in stats if s["quantized"]], default=8)
    limit = max(top, 8) + 3
    for i, s in enumerate(stats):
        if s["quantized"]:
            bits_ax.barh(i, s["bits_mean"], xerr=s["bits_std"], color=colors[i], alpha=0.85, capsize=3)
            bits_ax.plot([s["bits_min"], s["bits_max"]], [i, i], "|-", color="#333333", lw=1, ms=9)
            bits_ax.annotate(f"{s['bits_mean']:.2f}", (s["bits_max"], i), xytext=(6, -3), textcoords="offset points", fontsize=8)
        else:  # kept in float: off the bits scale
            bits_ax.barh(i, limit, color=colors[i], alpha=0.35, hatch="//", edgecolor="#9aa5b1")
            bits_ax.annotate(f"float{s['bits_mean']:.0f}, not quantized", (0, i), xytext=(6, -3), textcoords="offset points",
                             fontsize=8, color="#333333")  # fmt: skip
    bits_ax.set_xlim(0, limit)
    bits_ax.set_xlabel("bits per weight (bar: mean ± std over groups, whiskers: min-max)")
    bits_ax.set_yticks(y, names, fontsize=8)
    bits_ax.invert_yaxis()
    bits_ax.grid(True, axis="x", alpha=0.3)
    shares = [100 * s["share"] for s in stats]
    share_ax.barh(y, shares, color=colors, alpha=0.85)
    for i, share in enumerate(shares):
        share_ax.annotate(f"{share:.1f} %", (share, i), xytext=(4, -3), textcoords="offset points", fontsize=8)
    share_ax.set_xlim(0, max(shares) * 1.3 + 1)
    share_ax.set_xlabel("share of the model size (%)")
    share_ax.grid(True, axis="x", alpha=0.3)
    total = sum(s["size_mb"] for s in stats)
    fig.suptitle(title or f"Learned bits per layer (total {total:.4f} MB)", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
