"""Lightning callback ``EMAFakeQuant``: a thin adapter over :class:`~qat_lightning.core.EMAFakeQuantizer`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from ..core._validate import check_number, check_patterns
from ..core.ema_quantizer import EMAFakeQuantizer
from .diffq import DiffQ


class EMAFakeQuant(pl.Callback):
    """Distiller-style QAT: fake-quantized weights (per channel) and activations (EMA-tracked ranges).

    ::

        Trainer(callbacks=[EMAFakeQuant(weight_bits=8, activation_bits=8)])
        Trainer(callbacks=[DiffQ(...), EMAFakeQuant(weights=False)])   # learned weight bits + 8-bit activations

    * ``setup``: prepares the LightningModule (before checkpoint weights load, so EMA buffers resume).
    * training steps update the activation ranges; validation, test, predict and the sanity check
      use the frozen ranges (modules in eval mode).
    * ``start_step``: before it quantization is off while the ranges warm up; ``freeze_step``: the
      ranges stop moving from that step on.
    * ``on_train_epoch_end`` logs ``quant/act_range_min``, ``quant/act_range_max`` (over layers) and
      ``quant/act_scale_mean``: one small reduction per epoch, nothing per step.

    Args:
        start_step: first global step with quantization on (0: from the start).
        freeze_step: global step from which the ranges are frozen (None: never).
        Other arguments: see :class:`~qat_lightning.core.EMAFakeQuantizer`.
    """

    def __init__(
        self,
        weight_bits: int = 8,
        activation_bits: int = 8,
        weight_mode: str = "symmetric",
        activation_mode: str = "asymmetric_unsigned",
        per_channel: bool = True,
        ema_decay: float = 0.999,
        weights: bool = True,
        activations: bool = True,
        quantize_inputs: bool = False,
        exclude: Sequence[str] = (),
        start_step: int = 0,
        freeze_step: int | None = None,
    ) -> None:
        self.options = dict(
            weight_bits=weight_bits, activation_bits=activation_bits, weight_mode=weight_mode,
            activation_mode=activation_mode, per_channel=per_channel, ema_decay=ema_decay, weights=weights,
            activations=activations, quantize_inputs=quantize_inputs, exclude=check_patterns("exclude", exclude),
        )  # fmt: skip
        EMAFakeQuantizer(torch.nn.Identity(), **self.options)  # validates every option now
        self.start_step = check_number("start_step", start_step, low=0, integer=True)
        if freeze_step is not None:
            check_number("freeze_step", freeze_step, low=start_step, integer=True)
        self.freeze_step = freeze_step
        self.evaluate_quantized = True  # False: validation / test / predict without fake quantization
        self.quantizer: EMAFakeQuantizer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.quantizer is not None:
            return
        if self.options["weights"] and any(isinstance(c, DiffQ) for c in trainer.callbacks):
            raise ValueError(
                "EMAFakeQuant(weights=True) and DiffQ would both quantize the weights: "
                "use EMAFakeQuant(weights=False) next to DiffQ (DiffQ weights + EMA activations)"
            )
        self.quantizer = EMAFakeQuantizer(pl_module, **self.options).prepare()
        rank_zero_info(f"EMAFakeQuant: {len(self.quantizer.activation_quantizers())} activation quantizers")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        frozen = self.freeze_step is not None and step >= self.freeze_step
        self._require_quantizer().set_state(enabled=step >= self.start_step, observe=not frozen)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_state(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_state(trainer)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_state(trainer)

    def _evaluation_state(self, trainer: pl.Trainer) -> None:
        # quantized evaluation as soon as training has reached start_step (ranges then exist)
        enabled = self.evaluate_quantized and trainer.global_step >= self.start_step
        self._require_quantizer().set_state(enabled=enabled)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantizers = [q for q in self._require_quantizer().activation_quantizers().values() if q.iter_count > 0]
        if not quantizers:
            return
        with torch.no_grad():
            pl_module.log("quant/act_range_min", torch.stack([q.tracked_min for q in quantizers]).min(), on_epoch=True)
            pl_module.log("quant/act_range_max", torch.stack([q.tracked_max for q in quantizers]).max(), on_epoch=True)
            pl_module.log("quant/act_scale_mean", torch.stack([q.scale for q in quantizers]).mean(), on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"options": dict(self.options), "start_step": self.start_step, "freeze_step": self.freeze_step}

    def _require_quantizer(self) -> EMAFakeQuantizer:
        if self.quantizer is None:
            raise RuntimeError("EMAFakeQuant has no quantizer yet: it is attached in setup(); use it through a Trainer")
        return self.quantizer
