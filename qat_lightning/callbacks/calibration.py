"""Lightning callback ``HistogramCalibration``: ModelOpt-style range calibration before QAT, or for PTQ."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ..coverage import CoverageReport, CoverageRow
from ..quantizers.activation import FakeLinearQuantization

from .._validate import check_bool, check_choice, check_forward_fn, check_number
from ..calibration.calibrate import WEIGHT_METHODS, calibrate
from ..calibration.histogram import MAX_BINS, METHODS

from ._param_groups import init_arguments
from .base import QuantizationCallback
from ._resume import attached_elsewhere, check_resumed_options
from ._precision import converted_batches, forward_context


class HistogramCalibration(QuantizationCallback):
    """Sets the fake-quant ranges of :class:`EMAFakeQuant` from histograms before training starts.

    ::

        Trainer(callbacks=[EMAFakeQuant(), HistogramCalibration(method="entropy", num_batches=16)])
        trainer.fit(model, data)        # calibrated at train start, then EMA / LSQ takes over
        trainer.validate(model, data)   # PTQ: calibrated on validation batches, then evaluated

    * ``on_train_start``: runs ``num_batches`` training batches in eval mode without gradients and
      with quantization off, histograms every activation quantizer's input and sets its range by
      ``method``; weights get a clipping value by ``weight_method`` (per output channel). The EMA
      then continues from these ranges (counted as ``num_batches`` observations); LSQ step sizes
      start from them.
    * ``trainer.validate`` / ``test`` without a fit: calibrates on the first ``num_batches`` of
      that stage's first dataloader (post-training quantization).
    * Calibrates once: the flag is saved in checkpoints, so a resumed run keeps its ranges.

    Args:
        method: ``"entropy"``, ``"mse"``, ``"percentile"`` or ``"max"`` for activations.
        num_batches: batches to collect histograms over.
        percentile: for ``"percentile"`` (activations and weights).
        num_bins: histogram bins.
        stride, start_bin: candidate grid of the entropy / mse searches.
        weights: also calibrate the weight clipping values.
        weight_method: ``"max"``, ``"mse"`` or ``"percentile"`` for weights.
        forward_fn: ``(module, batch) -> output``; default: ``module(batch[0])`` for tuples/lists,
            ``module(**batch)`` for dicts, ``module(batch)`` for tensors.
    """

    def __init__(
        self,
        method: str = "entropy",
        num_batches: int = 16,
        percentile: float = 99.99,
        num_bins: int = 2048,
        stride: int = 1,
        start_bin: int = 128,
        weights: bool = True,
        weight_method: str = "percentile",
        forward_fn: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.hparams = init_arguments(locals())  # logged once to the Trainer's loggers
        self.method = check_choice("method", method, (*METHODS, "max"))
        self.num_batches = check_number("num_batches", num_batches, low=1, integer=True)
        self.percentile = check_number("percentile", percentile, low=0, high=100, low_open=True)
        self.num_bins = check_number("num_bins", num_bins, low=2, high=MAX_BINS, integer=True)
        self.stride = check_number("stride", stride, low=1, integer=True)
        self.start_bin = check_number("start_bin", start_bin, low=0, integer=True)
        self.weights = check_bool("weights", weights)
        self.weight_method = check_choice("weight_method", weight_method, WEIGHT_METHODS)
        self.forward_fn = check_forward_fn(forward_fn)
        self.calibrated = False
        self.ranges: dict[str, tuple[float, float]] = {}

    order = 30  # last: the ranges of the model as rescaling and post-training quantization left it

    @override
    def requires(self) -> dict[str, str]:
        return {"ranges": "HistogramCalibration sets the ranges of EMAFakeQuant's Distiller / LSQ grids: add EMAFakeQuant(...) "
                          "to the Trainer's callbacks (formats whose scales come from each tensor have no range to calibrate)"}  # fmt: skip

    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if attached_elsewhere(self, pl_module):  # a new model: calibrate it too
            self.calibrated, self.ranges = False, {}

    @override
    def _on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate(trainer, pl_module, trainer.train_dataloader)

    @override
    def _on_evaluation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._calibrate(trainer, pl_module, _first(trainer.val_dataloaders if stage == "validate" else trainer.test_dataloaders))

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any) -> None:
        if self.calibrated:
            return
        if loader is None:
            raise ValueError("HistogramCalibration: no dataloader to calibrate on")
        with forward_context(trainer):
            self.ranges = calibrate(
                pl_module, converted_batches(trainer, loader), method=self.method, num_batches=self.num_batches,
                forward_fn=self.forward_fn, num_bins=self.num_bins, percentile=self.percentile, stride=self.stride,
                start_bin=self.start_bin, weights=self.weights, weight_method=self.weight_method,
            )  # fmt: skip
        self.calibrated = True
        rank_zero_info(f"HistogramCalibration: {len(self.ranges)} activation ranges by {self.method!r} over {self.num_batches} batches")
        rows = [CoverageRow(name, "activation", type(m).__name__, None, f"range by {self.method}" if name in self.ranges else None,
                            "" if name in self.ranges else "never ran during calibration: its range is not set")
                for name, m in pl_module.named_modules() if isinstance(m, FakeLinearQuantization)]  # fmt: skip
        self.report_coverage(trainer, CoverageReport("HistogramCalibration", rows))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn enum
        if stage in ("validate", "test") and not self.calibrated and not trainer.sanity_checking:
            raise ValueError(
                f"HistogramCalibration: trainer.{stage}() ran no batch (an empty dataloader, or limit_"
                f"{'val' if stage == 'validate' else 'test'}_batches=0): nothing was calibrated or evaluated. Pass calibration data"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"calibrated": self.calibrated, **self._options()}

    def _options(self) -> dict[str, Any]:
        return {"method": self.method, "num_batches": self.num_batches, "percentile": self.percentile, "num_bins": self.num_bins,
                "stride": self.stride, "start_bin": self.start_bin, "weights": self.weights, "weight_method": self.weight_method}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calibrated = bool(state_dict.get("calibrated", False))
        if self.calibrated:  # the checkpoint's ranges stay: other options are not applied
            check_resumed_options("HistogramCalibration", {k: v for k, v in state_dict.items() if k != "calibrated"}, self._options(), ())


def _first(loaders: Any) -> Any:
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders
