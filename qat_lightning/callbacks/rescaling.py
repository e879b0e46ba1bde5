"""Lightning callback ``Rescaling``: SmoothQuant rescaling on the first batches, before QAT goes on."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from .._validate import check_forward_fn, check_number, check_patterns
from ..calibration.calibrate import default_forward
from ..calibration.rescaling import RescalingCalibrator
from ._param_groups import init_arguments
from .base import QuantizationCallback, of
from ._resume import attached_elsewhere, check_resumed_options, guard_checkpoint
from ._precision import converted_batches, forward_context


class Rescaling(QuantizationCallback):
    """SmoothQuant: moves activation outliers into the weights before (or during) QAT.

    ::

        Trainer(callbacks=[Rescaling(alpha=0.5), EMAFakeQuant(), HistogramCalibration()])

    * ``setup``: plans the rescaling on the LightningModule (``torch.fx`` finds which LayerNorm /
      RMSNorm / BatchNorm / Linear / Conv output feeds which layers) and adds the ``input_scale``
      submodules of layers whose scale cannot be folded, so checkpoints load into the same structure.
    * ``on_train_start``: runs ``num_batches`` training batches in eval mode without gradients and
      with every other callback's quantization off (their ``disabled()``), then rescales in place
      (weights and norms changed, the float function unchanged); first in the stack, so that
      calibration and post-training quantization see the rescaled model.
    * Rescales once; the flag is saved in checkpoints, so a resumed run does not rescale again.

    Args:
        alpha: migration strength in ``[0, 1]`` (0.5 balances; larger moves more to the weights).
        num_batches: training batches the statistics are collected over.
        exclude: fnmatch patterns of module names not rescaled.
        forward_fn: ``(module, batch) -> output``; default as in :class:`HistogramCalibration`.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        num_batches: int = 16,
        exclude: Sequence[str] = (),
        forward_fn: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.hparams = init_arguments(locals())  # logged once to the Trainer's loggers
        self.alpha = check_number("alpha", alpha, low=0, high=1)
        self.num_batches = check_number("num_batches", num_batches, low=1, integer=True)
        self.exclude = check_patterns("exclude", exclude)
        self.forward_fn = check_forward_fn(forward_fn) or default_forward
        self.calibrator: RescalingCalibrator | None = None
        self.rescaled = False

    order = 0  # its input_scale modules exist before quantizers attach (they are quantization points)

    @override
    def provides(self) -> frozenset[str]:
        return frozenset({"input_scales"})

    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if attached_elsewhere(self, pl_module):  # a new model: plan and rescale it too
            self.calibrator, self.rescaled = None, False
        guard_checkpoint(trainer, pl_module, self, self._check_checkpoint_options, lambda key: ".input_scale." in key)
        if self.calibrator is None:
            excluded = [m for name, m in pl_module.named_modules() if name and any(fnmatch(name, p) for p in self.exclude)]
            self.calibrator = RescalingCalibrator(pl_module, excluded_modules=excluded, inplace=True)
            self.calibrator.add_input_scales()

    @override
    def _on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rescale(trainer, pl_module)

    def rescale(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect the statistics and rescale, once (later calls do nothing)."""
        calibrator = self.calibrator
        if calibrator is None:
            raise RuntimeError("Rescaling has no calibrator: it is created in setup(); use it through a Trainer")
        if self.rescaled:  # done, or resumed: the checkpoint holds the rescaled weights and scales
            calibrator.close()
            return
        modes = {m: m.training for m in pl_module.modules()}
        try:
            pl_module.eval()
            with torch.no_grad(), forward_context(trainer), of(trainer).disabled(but=self):  # statistics of the float model
                for index, batch in enumerate(converted_batches(trainer, trainer.train_dataloader)):
                    if index >= self.num_batches:
                        break
                    self.forward_fn(pl_module, batch)
        finally:
            for module, training in modes.items():
                module.training = training
        calibrator.rescale(alpha=self.alpha)
        self.rescaled = True
        rank_zero_info(f"Rescaling: alpha={self.alpha}, folded into {sorted(calibrator.folded())}")
        self.report_coverage(trainer, calibrator.coverage())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rescaled": self.rescaled, "alpha": self.alpha, "num_batches": self.num_batches, "exclude": list(self.exclude)}

    def _check_checkpoint_options(self, state: dict[str, Any], warn: bool = False) -> None:
        options = {k: v for k, v in state.items() if k != "rescaled"}
        current = self.state_dict()
        check_resumed_options("Rescaling", {k: v for k, v in options.items() if k == "exclude"}, current, ("exclude",))
        if warn and state.get("rescaled"):  # rescaled already: the checkpoint's alpha stays
            check_resumed_options("Rescaling", {k: v for k, v in options.items() if k != "exclude"}, current, ())

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_checkpoint_options(state_dict, warn=True)
        self.rescaled = bool(state_dict.get("rescaled", False))
