"""The Hydra app: every config composes and instantiates; the entry point runs end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from qat_lightning import AdaScale, DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling
from qat_lightning.app.train import instantiate_group, objective

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "qat_lightning" / "app" / "conf"
SWEEP_PLUGINS = {"joblib": "hydra_plugins.hydra_joblib_launcher", "optuna_size_accuracy": "hydra_plugins.hydra_optuna_sweeper"}
SUMMARY_KEYS = {"float_size_mb", "quantized_size_mb", "compression", "avg_bits", "float_test_acc", "quantized_test_acc"}


def compose_train(overrides: list[str]):  # noqa: ANN201
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=False)


@pytest.mark.parametrize("group", sorted(p.name for p in CONF.iterdir() if p.is_dir()))
def test_every_config_option_composes_and_instantiates(group: str, tmp_path: Path) -> None:
    if group == "sweep":  # the presets name the launcher / sweeper plugins of the extra
        for plugin in SWEEP_PLUGINS.values():
            pytest.importorskip(plugin, reason="needs the extra qat-lightning[sweep]")
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        optional = group in ("ptq", "sweep")  # not in the defaults list: appended with +ptq=..., +sweep=...
        cfg = compose_train([f"{'+' if optional else ''}{group}={option}"])
        node = cfg.get(group)
        if group in ("callbacks", "ptq"):
            objects = instantiate_group(node)
            assert all(hasattr(o, "setup") for o in objects)
        elif group == "experiment":  # a recipe: sets several groups; its callbacks instantiate
            assert all(hasattr(o, "setup") for o in instantiate_group(cfg.callbacks)), option
        elif node and "_target_" in node:
            if group == "model" and "vocab_size" in node and node.vocab_size is None:  # the app takes it from the data
                node = OmegaConf.merge(node, {"vocab_size": 97})
            if group in ("trainer", "logger"):
                node = OmegaConf.merge(node, {"default_root_dir" if group == "trainer" else "save_dir": str(tmp_path)})
            assert instantiate(node) is not None


@pytest.mark.parametrize(
    ("option", "key", "callback"),
    [
        ("diffq", "diffq", DiffQ), ("ema_fake_quant", "ema_fake_quant", EMAFakeQuant),
        ("histogram_calibration", "histogram_calibration", HistogramCalibration), ("rescaling", "rescaling", Rescaling),
        ("+ptq=adascale", "adascale", AdaScale),
    ],
)
def test_callback_yaml_mirrors_every_argument(option: str, key: str, callback: type) -> None:
    import inspect

    group, name = ("ptq", option.split("=")[1]) if option.startswith("+") else ("callbacks", option)
    cfg = compose_train([option if option.startswith("+") else f"callbacks={option}"])
    documented = set(cfg[group][key]) - {"_target_"}
    arguments = set(inspect.signature(callback.__init__).parameters) - {"self"}
    assert documented == arguments
    text = (CONF / group / f"{name}.yaml").read_text()
    for name in arguments:
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{name}:"))
        assert "#" in line, f"{name} has no comment in {option}.yaml"


def test_combined_config_gives_diffq_weights_and_ema_activations() -> None:
    diffq, ema = instantiate_group(compose_train(["callbacks=diffq_ema"]).callbacks)
    assert isinstance(diffq, DiffQ) and isinstance(ema, EMAFakeQuant) and ema.options["weights"] is False


def test_overrides_reach_the_callback() -> None:
    cfg = compose_train(["callbacks.diffq.penalty=5", "trainer.max_epochs=3"])
    (diffq,) = instantiate_group(cfg.callbacks)
    assert diffq.penalty == 5 and cfg.trainer.max_epochs == 3
    assert instantiate_group(compose_train(["callbacks=none"]).callbacks) == []


def test_bad_override_fails_at_construction() -> None:
    cfg = compose_train(["callbacks.diffq.group_size=-1"])
    with pytest.raises(Exception, match="group_size must be an integer >= 0"):
        instantiate_group(cfg.callbacks)


def _run_app(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    cmd = [sys.executable, "-m", "qat_lightning.train", *(["-m"] if multirun else []), f"{key}={tmp_path}",
           "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
           "trainer.enable_progress_bar=false", *overrides]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_app_runs_and_writes_summary(tmp_path: Path) -> None:
    result = _run_app(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["compression"] > 3 and summary["avg_bits"] < 9
    assert "compression" in result.stdout and "quantized test accuracy" in result.stdout
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").exists()
    assert (tmp_path / "diffq_layers.png").exists() and "bits per layer" in result.stdout + result.stderr


def test_app_float_baseline_and_multirun(tmp_path: Path) -> None:
    _run_app(tmp_path, "callbacks.diffq.penalty=0,3", "model=cnn", multirun=True)
    sizes = [json.loads((tmp_path / str(i) / "summary.json").read_text())["quantized_size_mb"] for i in (0, 1)]
    assert len(sizes) == 2
    baseline = tmp_path / "float"
    _run_app(baseline, "callbacks=none")
    summary = json.loads((baseline / "summary.json").read_text())
    assert summary["compression"] == 1.0 and summary["float_test_acc"] == summary["quantized_test_acc"]
    report = subprocess.run([sys.executable, "-m", "qat_lightning.report", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert "3 configurations" in report.stdout and (tmp_path / "report.png").exists()
    assert "penalty=0" in (tmp_path / "report.csv").read_text()


@pytest.mark.parametrize("sweep", ["joblib", "optuna_size_accuracy"])
def test_app_sweep_presets(sweep: str, tmp_path: Path) -> None:
    pytest.importorskip(SWEEP_PLUGINS[sweep], reason="needs the extra qat-lightning[sweep]")
    extra = ["callbacks.diffq.penalty=0,3"] if sweep == "joblib" else ["hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.population_size=2"]
    _run_app(tmp_path, f"+sweep={sweep}", "data.num_samples=500", "trainer.max_epochs=1", *extra, multirun=True)
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    if sweep == "optuna_size_accuracy":  # both objectives (size, accuracy) went back to the sweeper
        results = OmegaConf.load(tmp_path / "optimization_results.yaml")
        runs = [json.loads(p.read_text()) for p in summaries]
        pairs = {(r["quantized_size_mb"], r["quantized_test_acc"]) for r in runs}
        assert results.solutions and all(tuple(s["values"]) in pairs for s in results.solutions)


def test_objective_returns_one_value_or_a_tuple() -> None:
    summary = {"quantized_size_mb": 0.15, "quantized_test_acc": 0.8}
    assert objective(summary, "quantized_test_acc") == 0.8
    assert objective(summary, ["quantized_size_mb", "quantized_test_acc"]) == (0.15, 0.8)
    assert objective({}, "quantized_test_acc") is None
    with pytest.raises(KeyError, match="objective \\['accuracy'\\] not in the run summary"):
        objective(summary, "accuracy")


def test_app_post_training_adascale(tmp_path: Path) -> None:
    result = _run_app(tmp_path, "callbacks=none", "+ptq=adascale", "ptq.adascale.num_batches=2", "ptq.adascale.num_iterations=5",
                      "ptq.adascale.progress=false", "model=transformer")  # fmt: skip
    ptq = json.loads((tmp_path / "summary.json").read_text())["ptq"]
    assert ptq["method"] == "AdaScale" and ptq["bits"] == 4 and 0 <= ptq["rtn_test_acc"] <= 1 and 0 <= ptq["ptq_test_acc"] <= 1
    assert "post-training W4: round-to-nearest" in result.stdout


def test_misspelled_keys_fail_with_hydras_own_message() -> None:
    from hydra.errors import ConfigCompositionException, InstantiationException

    with pytest.raises(ConfigCompositionException, match="penaltyy"):
        compose_train(["callbacks.diffq.penaltyy=3"])
    with pytest.raises(ConfigCompositionException, match="max_epoch"):
        compose_train(["trainer.max_epoch=3"])
    cfg = compose_train(["+callbacks.diffq.penaltyy=3"])  # forced in with +: the callback names it
    with pytest.raises(InstantiationException, match="penaltyy"):
        instantiate_group(cfg.callbacks)


def test_lm_experiment_pretrains_then_fine_tunes_and_reports_bits_per_character(tmp_path: Path) -> None:
    """experiment=lm_diffq: float pretraining, then DiffQ on the decoder; the summary names the metric."""
    result = _run_app(tmp_path, "experiment=lm_diffq", "pretrain.steps=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
                      "data.val_windows=32", "data.test_windows=32", "model.layers=1", "logger=none")  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_metric"] == "test/bpc" and 0 < summary["quantized_test_acc"] < 8
    assert 2 < summary["stored_bits"] < 6 and summary["stored_bits"] > summary["avg_bits"]  # widths and ranges counted
    assert "quantized test/bpc" in result.stdout and "pretrained 2 float steps" in result.stdout + result.stderr
    assert "a float16 symmetric range [-m, m] per channel" in result.stdout + result.stderr  # the coverage report names the grid


def test_pretrain_refuses_a_learning_rate_the_model_cannot_take() -> None:
    from qat_lightning.app.train import pretrain

    cfg = compose_train(["pretrain.steps=1", "pretrain.lr=0.1"])
    with pytest.raises(ValueError, match="pretrain.lr is set but Module has no lr attribute"):
        pretrain(cfg, torch.nn.Module(), None)


def test_readme_diffq_recipe_is_the_experiment_config() -> None:
    """The ``DiffQ(...)  # lm_diffq_min4`` call shown in README.md sets what experiment=lm_diffq_min4 sets."""
    import ast

    readme = (ROOT / "README.md").read_text()
    start = readme.index("DiffQ(scale=")
    code = readme[start : readme.index("# lm_diffq_min4", start)]
    call = ast.parse(code.strip(), mode="eval").body
    shown = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    cfg = OmegaConf.to_container(compose_train(["experiment=lm_diffq_min4"]).callbacks.diffq)
    assert shown == {key: cfg[key] for key in shown}
    left_out = {"_target_", "include", "exclude", "min_size", "layer_report"}  # decoder-only patterns and the report: not DiffQ's grid
    defaults = DiffQ()
    assert {key for key, value in cfg.items() if value != getattr(defaults, key, value)} - left_out <= set(shown)
