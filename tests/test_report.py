"""Sweep report (CSV + PNG with the Pareto frontier) and the per-layer bits picture."""
import csv
import json
from pathlib import Path

import pytest
import torch

from qat_lightning import DiffQuantizer
from qat_lightning.demo import MLP
from qat_lightning.app.plots import format_layer_table, plot_layer_bits
from qat_lightning.app.report import collect, main, mark_pareto, merge_seeds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_sweep(root: Path, runs: list[tuple[str, float, float]], **fields) -> Path:  # noqa: ANN003
    """A multirun-shaped folder: <root>/<job>/summary.json + .hydra/overrides.yaml (``override``: one
    or more, space-separated); ``fields``: more summary entries."""
    for job, (override, size, acc) in enumerate(runs):
        run = root / str(job)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in override.split()) + "- trainer.max_epochs=30\n")
        summary = dict(float_size_mb=1.1, quantized_size_mb=size, quantized_test_acc=acc, float_test_acc=0.82,
                       compression=1.1 / size, avg_bits=32 * size / 1.1, **fields)  # fmt: skip
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


def test_seeds_of_one_configuration_are_one_point_with_their_spread(tmp_path: Path) -> None:
    runs = [
        ("experiment=a seed=0", 0.14, 0.80), ("experiment=a seed=1", 0.16, 0.84), ("experiment=a seed=2", 0.15, 0.82),
        ("experiment=b seed=0", 0.15, 0.83), ("experiment=b seed=1", 0.15, 0.81),
        ("experiment=c seed=0", 0.20, 0.815),  # larger than a, and worse than a's mean: dominated
    ]  # fmt: skip
    root = _fake_sweep(tmp_path / "sweep", runs)
    per_seed = main([str(root), "--per-seed", "--out", str(tmp_path / "per_seed")])
    assert len(per_seed) == 6 and [r.pareto for r in per_seed] == [True, True, False, True, False, False]
    merged = main([str(root)])
    assert [r.label for r in merged] == ["a", "b", "c"]  # a recipe by its name
    a, b, c = merged
    assert (a.seeds, b.seeds, c.seeds) == (3, 2, 1)
    assert a.size == pytest.approx(0.15) and a.accuracy == pytest.approx(0.82)  # the means
    assert a.extra["quantized_test_acc_std"] == pytest.approx(0.02)  # sample std of 0.80, 0.84, 0.82
    assert b.extra["quantized_test_acc_std"] == pytest.approx(0.0141421356)
    assert a.summary["compression"] == pytest.approx((1.1 / 0.14 + 1.1 / 0.16 + 1.1 / 0.15) / 3)
    assert [r.pareto for r in merged] == [False, True, False]  # b: as small as a, and better on average
    rows = list(csv.DictReader((root / "report.csv").open()))
    assert [row["seeds"] for row in rows] == ["3", "2", "1"]
    assert rows[0]["seed_values"] == "0 1 2" and float(rows[0]["quantized_test_acc_std"]) == pytest.approx(0.02)
    assert rows[0]["overrides"] == "experiment=a trainer.max_epochs=30"
    assert rows[2]["seed_values"] == "0" and rows[2]["quantized_test_acc_std"] == ""


def test_bits_per_character_is_better_lower(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = [("experiment=lm_float", 2.4, 2.00), ("experiment=lm_diffq", 0.30, 2.01), ("experiment=lm_lsq_w4", 0.31, 2.02),
            ("experiment=lm_lsq_w3", 0.25, 2.05)]  # fmt: skip
    root = _fake_sweep(tmp_path / "sweep", runs, test_metric="test/bpc")
    # an LM sweep: the float run is the 32-bit one
    for job in (0,):
        summary = json.loads((root / str(job) / "summary.json").read_text())
        (root / str(job) / "summary.json").write_text(json.dumps({**summary, "avg_bits": 32}))
    reported = main([str(root)])
    assert [r.pareto for r in reported] == [True, True, False, True]  # lsq_w4: larger and higher bpc than diffq
    assert "test/bpc: lower is better" in capsys.readouterr().out
    assert [r.pareto for r in main([str(root), "--higher-is-better"])] == [False, False, False, True]  # lsq_w3 "best"
    assert merge_seeds(collect(root))[1].pareto  # the direction follows the metric's name
    other = _fake_sweep(tmp_path / "mixed", [("a=1", 0.1, 0.8)], test_metric="test/bpc")
    _fake_sweep(other / "more", [("a=2", 0.1, 0.8)])
    with pytest.raises(ValueError, match=r"different test metrics \['test/acc', 'test/bpc'\]"):
        collect(other)
