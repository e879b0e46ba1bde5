"""Fitting the user's habits: LightningCLI configs, Hydra ``_target_``, any Lightning logger."""
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from qat_lightning import AdaScale, DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling

from .helpers import tiny_loader, tiny_model, tiny_trainer

CALLBACKS = {
    DiffQ: {"penalty": 2.5, "group_size": 4, "exclude": ["*.bias"]},
    EMAFakeQuant: {"activation_bits": 6, "learned_step": True},
    HistogramCalibration: {"method": "percentile", "percentile": 99.9},
    Rescaling: {"alpha": 0.7},
    AdaScale: {"bits": 3, "num_iterations": 5},
}


def _cli(tmp_path: Path, callbacks: list[dict], max_steps: int = 0):  # noqa: ANN202
    pytest.importorskip("jsonargparse", reason="LightningCLI needs the extra qat-lightning[cli]")
    from lightning.pytorch.cli import LightningCLI

    config = {
        "model": {"class_path": "qat_lightning.demo.Classifier",
                  "init_args": {"net": {"class_path": "qat_lightning.demo.MLP", "init_args": {"hidden": [32]}}}},
        "data": {"class_path": "qat_lightning.demo.MNIST1DDataModule", "init_args": {"num_samples": 500, "batch_size": 50}},
        "trainer": {"max_steps": max_steps, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path), "callbacks": callbacks, "limit_val_batches": 2},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with mock.patch.object(sys, "argv", ["prog"]):  # not pytest's arguments
        return LightningCLI(run=False, args=["--config", str(path)], save_config_callback=None)


@pytest.mark.parametrize("callback", list(CALLBACKS), ids=lambda c: c.__name__)
def test_every_callback_from_a_lightning_cli_config(callback: type, tmp_path: Path) -> None:
    spec = [{"class_path": f"qat_lightning.{callback.__name__}", "init_args": CALLBACKS[callback]}]
    cli = _cli(tmp_path, spec)
    (made,) = [c for c in cli.trainer.callbacks if isinstance(c, callback)]
    _assert_in_effect(made, CALLBACKS[callback])


def test_lightning_cli_fit_with_diffq_and_ema(tmp_path: Path) -> None:
    spec = [{"class_path": "qat_lightning.DiffQ", "init_args": {"penalty": 2.0, "min_size": 0, "exclude": ["*.bias"]}},
            {"class_path": "qat_lightning.EMAFakeQuant", "init_args": {"weights": False}}]  # fmt: skip
    cli = _cli(tmp_path, spec, max_steps=3)
    cli.trainer.fit(cli.model, cli.datamodule)
    diffq = next(c for c in cli.trainer.callbacks if isinstance(c, DiffQ))
    assert cli.trainer.global_step == 3 and diffq.quantizer.true_model_size() < diffq.quantizer.float_model_size()


@pytest.mark.parametrize("callback", list(CALLBACKS), ids=lambda c: c.__name__)
def test_every_callback_from_a_hydra_target(callback: type) -> None:
    made = instantiate({"_target_": f"qat_lightning.{callback.__name__}", **CALLBACKS[callback]})
    assert isinstance(made, callback)
    _assert_in_effect(made, CALLBACKS[callback])


def _flat(state: dict) -> dict:
    return {k: v for key, value in state.items() for k, v in (_flat(value).items() if isinstance(value, dict) else [(key, value)])}


def _assert_in_effect(made: object, arguments: dict) -> None:
    """The options the callback works with (those its checkpoint state records and a resume
    compares), not the constructor's copy of its arguments, hold the configured values."""
    effective, default = _flat(made.state_dict()), _flat(type(made)().state_dict())
    for key, value in arguments.items():
        assert effective[key] == value != default[key], key


def test_csv_logger_gets_step_and_epoch_metrics_and_hyperparameters_once(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    callbacks = [DiffQ(penalty=2.0, min_size=0), EMAFakeQuant(weights=False)]
    tiny_trainer(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=callbacks).fit(tiny_model(), tiny_loader())
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for key in ("quant/model_size_mb", "quant/avg_bits", "quant/penalty", "quant/true_model_size_mb",
                "quant/compression", "quant/true_avg_bits"):  # fmt: skip
        assert key in header, key
    epoch_column = header.index("quant/true_model_size_mb")
    assert sum(1 for row in metrics[1:] if row.split(",")[epoch_column]) == 2  # once per epoch
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["DiffQ/penalty"] == 2.0 and hparams["EMAFakeQuant/weights"] is False
    assert hparams["DiffQ/exclude"] == []


def test_tensorboard_logger_gets_the_quant_scalars_and_hyperparameters(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    tiny_trainer(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1, callbacks=[DiffQ(min_size=0)]).fit(
        tiny_model(), tiny_loader()
    )
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"quant/model_size_mb", "quant/avg_bits", "quant/true_model_size_mb"} <= scalars
    assert len(events.Scalars("quant/model_size_mb")) == 4  # every step (64 samples / 16)
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["DiffQ/group_size"] == 8
