"""Lightning callback ``Rescaling``: SmoothQuant rescaling on the first batches, before QAT goes on."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from .._validate import check_forward_fn, check_number, check_patterns
from ..calibration.calibrate import default_forward
from ..calibration.rescaling import RescalingCalibrator
from .diffq import DiffQ
from .ema_fake_quant import EMAFakeQuant

from ._param_groups import check_trainer, init_arguments, log_hparams
from ._resume import attached_elsewhere, check_resumed_options, guard_checkpoint
from ._precision import converted_batches, forward_context


class Rescaling(pl.Callback):
    """SmoothQuant: moves activation outliers into the weights before (or during) QAT.

    ::

        Trainer(callbacks=[Rescaling(alpha=0.5), EMAFakeQuant(), HistogramCalibration()])

    * ``setup``: plans the rescaling on the LightningModule (``torch.fx`` finds which LayerNorm /
      RMSNorm / BatchNorm / Linear / Conv output feeds which layers) and adds the ``input_scale``
      submodules of layers whose scale cannot be folded, so checkpoints load into the same structure.
    * ``on_train_start``: runs ``num_batches`` training batches in eval mode without gradients and
      with every quantizer off, then rescales in place (weights and norms changed, the float
      function unchanged). ``HistogramCalibration`` runs it first if it comes earlier in the
      callbacks list, so that it calibrates the rescaled model.
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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_trainer(trainer, pl_module, self)
        log_hparams(trainer, self)
        if attached_elsewhere(self, pl_module):  # a new model: plan and rescale it too
            self.calibrator, self.rescaled = None, False
        guard_checkpoint(trainer, pl_module, self, self._check_checkpoint_options, lambda key: ".input_scale." in key)
        if self.calibrator is None:
            excluded = [m for name, m in pl_module.named_modules() if name and any(fnmatch(name, p) for p in self.exclude)]
            self.calibrator = RescalingCalibrator(pl_module, excluded_modules=excluded, inplace=True)
            self.calibrator.add_input_scales()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rescale(trainer, pl_module)

    def rescale(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Collect the statistics and rescale, once (later calls do nothing)."""
        calibrator = self.calibrator
        if calibrator is None:
            raise RuntimeError("Rescaling has no calibrator: it is created in setup(); use it through a Trainer")
        if self.rescaled:  # done, or resumed: the checkpoint holds the rescaled weights and scales
            calibrator.close()
            return
        restore = _quantizers_off(trainer)
        modes = {m: m.training for m in pl_module.modules()}
        try:
            pl_module.eval()
            with torch.no_grad(), forward_context(trainer):
                for index, batch in enumerate(converted_batches(trainer, trainer.train_dataloader)):
                    if index >= self.num_batches:
                        break
                    self.forward_fn(pl_module, batch)
        finally:
            for module, training in modes.items():
                module.training = training
            restore()
        calibrator.rescale(alpha=self.alpha)
        self.rescaled = True
        rank_zero_info(f"Rescaling: alpha={self.alpha}, folded into {sorted(calibrator.folded())}")

    def state_dict(self) -> dict[str, Any]:
        return {"rescaled": self.rescaled, "alpha": self.alpha, "num_batches": self.num_batches, "exclude": list(self.exclude)}

    def _check_checkpoint_options(self, state: dict[str, Any], warn: bool = False) -> None:
        options = {k: v for k, v in state.items() if k != "rescaled"}
        current = self.state_dict()
        check_resumed_options("Rescaling", {k: v for k, v in options.items() if k == "exclude"}, current, ("exclude",))
        if warn and state.get("rescaled"):  # rescaled already: the checkpoint's alpha stays
            check_resumed_options("Rescaling", {k: v for k, v in options.items() if k != "exclude"}, current, ())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_checkpoint_options(state_dict, warn=True)
        self.rescaled = bool(state_dict.get("rescaled", False))


def _quantizers_off(trainer: pl.Trainer) -> Callable[[], None]:
    """Switch off every quantizer the other callbacks installed; returns the function that restores them."""
    undo: list[Callable[[], None]] = []
    for callback in trainer.callbacks:
        quantizer = getattr(callback, "quantizer", None)
        if quantizer is None:
            continue
        if isinstance(callback, EMAFakeQuant):
            states = [(fq, fq.enabled, fq.observe) for fq in quantizer.activation_quantizers().values()]
            weights = quantizer.weights_enabled
            quantizer.set_state(enabled=False, observe=False)

            def restore_ema(states=states, quantizer=quantizer, weights=weights) -> None:  # noqa: ANN001
                for fq, enabled, observe in states:
                    fq.enabled, fq.observe = enabled, observe
                quantizer.weights_enabled = weights

            undo.append(restore_ema)
        elif isinstance(callback, DiffQ):
            enabled = quantizer.enabled
            quantizer.enabled = False
            undo.append(lambda quantizer=quantizer, enabled=enabled: setattr(quantizer, "enabled", enabled))

    def restore() -> None:
        for fn in undo:
            fn()

    return restore
