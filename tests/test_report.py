"""Sweep report (CSV + PNG with the Pareto frontier) and the per-layer bits picture."""
import csv
import json
from pathlib import Path

import pytest
import torch

from qat_lightning import DiffQuantizer
from qat_lightning.demo import MLP
from qat_lightning.app.plots import format_layer_table, plot_layer_bits
from qat_lightning.app.report import collect, main, mark_pareto

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_sweep(root: Path, runs: list[tuple[str, float, float]]) -> Path:
    """A multirun-shaped folder: <root>/<job>/summary.json + .hydra/overrides.yaml."""
    for job, (override, size, acc) in enumerate(runs):
        run = root / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- {override}\n- trainer.max_epochs=30\n")
        summary = dict(float_size_mb=1.1, quantized_size_mb=size, quantized_test_acc=acc, float_test_acc=0.82,
                       compression=1.1 / size, avg_bits=32 * size / 1.1)  # fmt: skip
        (run / "summary.json").write_text(json.dumps(summary))
    return root


def test_report_finds_the_pareto_frontier_and_writes_csv_and_png(tmp_path: Path) -> None:
    runs = [
        ("callbacks.diffq.penalty=0", 0.30, 0.83),   # largest, most accurate: frontier
        ("callbacks.diffq.penalty=1", 0.16, 0.82),   # frontier
        ("callbacks.diffq.penalty=3", 0.17, 0.80),   # dominated by penalty=1 (smaller and better)
        ("callbacks.diffq.penalty=10", 0.10, 0.75),  # smallest: frontier
        ("callbacks.diffq.penalty=30", 0.10, 0.70),  # same size as penalty=10, worse: dominated
    ]  # fmt: skip
    root = _fake_sweep(tmp_path / "sweep", runs)
    collected = main([str(root)])
    assert [r.label for r in collected] == ["penalty=0", "penalty=1", "penalty=3", "penalty=10", "penalty=30"]
    assert [r.pareto for r in collected] == [True, True, False, True, False]
    rows = list(csv.DictReader((root / "report.csv").open()))
    assert [row["pareto"] for row in rows] == ["True", "True", "False", "True", "False"]
    assert rows[2]["overrides"] == "callbacks.diffq.penalty=3 trainer.max_epochs=30"
    assert float(rows[3]["quantized_size_mb"]) == 0.10
    png = (root / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000


def test_report_orders_jobs_numerically_and_explains_empty_folders(tmp_path: Path) -> None:
    root = _fake_sweep(tmp_path / "sweep", [(f"callbacks.diffq.penalty={i}", 0.1 + i / 100, 0.8) for i in range(12)])
    assert [r.path.name for r in collect(root)] == [str(i) for i in range(12)]  # 10 after 9, not after 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no summary.json under"):
        collect(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such sweep directory"):
        collect(tmp_path / "missing")
    bad = tmp_path / "bad" / "0"
    bad.mkdir(parents=True)
    (bad / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks"):
        collect(tmp_path / "bad")


def test_mark_pareto_keeps_ties() -> None:
    class R:
        def __init__(self, size: float, accuracy: float) -> None:
            self.size, self.accuracy, self.pareto = size, accuracy, False

    a, b, c = R(1.0, 0.9), R(1.0, 0.9), R(2.0, 0.8)
    assert mark_pareto([a, b, c]) == [a, b] and not c.pareto


def test_layer_stats_add_up_to_the_true_size_and_draw(tmp_path: Path) -> None:
    torch.manual_seed(0)
    q = DiffQuantizer(MLP(hidden=(64, 64)), min_size=0.001, group_size=8, float16=True)
    for logit in q.parameters():
        logit.data.normal_(0, 2)
    stats = q.layer_stats()
    assert sum(s["size_mb"] for s in stats) == pytest.approx(q.true_model_size(), rel=1e-12)
    assert sum(s["share"] for s in stats) == pytest.approx(1.0)
    weight = next(s for s in stats if s["quantized"])
    bits = q.true_bits(q.quantized_params()[0])
    assert weight["bits_mean"] == pytest.approx(bits.mean().item()) and weight["bits_max"] == bits.max().item()
    assert {s["bits_mean"] for s in stats if not s["quantized"]} == {16}  # float16=True
    table = format_layer_table(stats)
    assert weight["name"] in table and "total" in table
    path = plot_layer_bits(stats, tmp_path / "layers.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
