"""Lightning callback ``EMAFakeQuant``: a thin adapter over :class:`~qat_lightning.quantizers.fake_quantizer.EMAFakeQuantizer`."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from .._options import args_doc, declared
from .._validate import check_number, check_patterns
from ..formats.distiller import DistillerFormat
from ..quantizers.activation import FakeLinearQuantization
from ..quantizers.fake_quantizer import EMAFakeQuantizer, FakeQuantConfig
from ._param_groups import init_arguments, move_to_own_group
from .base import QuantizationCallback
from ._resume import attached_elsewhere, check_resumed_options, guard_checkpoint


class EMAFakeQuant(QuantizationCallback):
    """Distiller-style QAT: fake-quantized weights (per channel) and activations (EMA-tracked ranges).

    ::

        Trainer(callbacks=[EMAFakeQuant(weight_bits=8, activation_bits=8)])
        Trainer(callbacks=[DiffQ(...), EMAFakeQuant(weights=False)])   # learned weight bits + 8-bit activations
        Trainer(callbacks=[EMAFakeQuant(weight_format="int4_g32", activation_format="int8_per_token",
                                        activation_position="inputs")])  # torchao's int8-dynamic / int4 QAT

    * ``setup``: prepares the LightningModule (before checkpoint weights load, so EMA buffers resume).
    * training steps update the activation ranges; validation, test, predict and the sanity check
      use the frozen ranges (modules in eval mode).
    * ``start_step``: before it quantization is off while the ranges warm up; ``freeze_step``: the
      ranges stop moving from that step on.
    * ``on_train_epoch_end`` logs ``quant/act_range_min``, ``quant/act_range_max`` (over layers) and
      ``quant/act_scale_mean``: one small reduction per epoch, nothing per step.
    * ``learned_step=True`` (LSQ): the step sizes are parameters; ``on_fit_start`` moves them into
      their own param group (``step_lr``, ``step_weight_decay``) like ``DiffQ`` does with its bits.

    Args (the callback's own; default in the signature):

    {callback_options}

    The quantizer's options (declared once in :class:`~qat_lightning.quantizers.fake_quantizer.FakeQuantConfig`;
    ``activation_types`` stays the default here):

    {options}
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
        include: Sequence[str] | None = None,
        start_step: int = 0,
        freeze_step: int | None = None,
        learned_step: bool = False,
        quantize_bias: bool = False,
        step_lr: float | None = None,
        step_weight_decay: float = 0.0,
        weight_format: str | None = None,
        activation_format: str | None = None,
        activation_position: str = "outputs",
        fold_batchnorm: bool = False,
    ) -> None:
        arguments = locals()
        self.hparams = init_arguments(arguments)  # logged once to the Trainer's loggers
        self.options = {name: arguments[name] for name in declared(FakeQuantConfig) if name in arguments}
        self.options["exclude"] = check_patterns("exclude", exclude)
        probe = EMAFakeQuantizer(torch.nn.Identity(), **self.options)  # validates every option now
        self.weight_format, self.activation_format = probe.weight_format, probe.activation_format
        self.start_step = check_number("start_step", start_step, low=0, integer=True)
        if freeze_step is not None:
            check_number("freeze_step", freeze_step, low=start_step, integer=True)
        self.freeze_step = freeze_step
        if step_lr is not None:
            check_number("step_lr", step_lr, low=0, low_open=True)
        self.step_lr = step_lr
        self.step_weight_decay = check_number("step_weight_decay", step_weight_decay, low=0)
        self._step_optimizer: torch.optim.Optimizer | None = None
        self._frozen_checked = False
        self.evaluate_quantized = True  # False: validation / test / predict without fake quantization
        self.quantizer: EMAFakeQuantizer | None = None

    # options that define the quantizers and their grids: a checkpoint must be resumed / evaluated with the same
    STRUCTURAL_OPTIONS = ("weight_bits", "activation_bits", "weight_mode", "activation_mode", "per_channel", "weights",
                          "activations", "quantize_inputs", "exclude", "include", "learned_step", "quantize_bias", "weight_format",
                          "activation_format", "activation_position", "fold_batchnorm")  # fmt: skip

    order = 10
    supports_fsdp2 = True
    conflict_hint = "use EMAFakeQuant(weights=False) next to DiffQ or AdaScale (their weights, fake-quantized activations)"

    @override
    def quantizes(self) -> frozenset[str]:
        options = self.options
        return frozenset({"weights"} if options["weights"] else set()) | frozenset(
            {"activations"} if options["activations"] or options["quantize_inputs"] else set()
        )

    @override
    def provides(self) -> frozenset[str]:
        """``"ranges"``: Distiller's grids have ranges a calibration can set (dynamic formats do not)."""
        ranged = (self.options["weights"] and isinstance(self.weight_format, DistillerFormat)) or (
            self.options["activations"] and isinstance(self.activation_format, DistillerFormat) and not self.activation_format.dynamic
        )
        return frozenset({"ranges"}) if ranged else frozenset()

    @override
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        quantizer = self.quantizer
        if quantizer is None:
            yield
            return
        states = [(fq, fq.enabled, getattr(fq, "observe", None)) for fq in quantizer.activation_quantizers().values()]
        weights = quantizer.weights_enabled
        quantizer.set_state(enabled=False, observe=False)
        try:
            yield
        finally:
            for fq, enabled, observe in states:
                fq.enabled = enabled
                if observe is not None:
                    fq.observe = observe
            quantizer.weights_enabled = weights

    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if attached_elsewhere(self, pl_module):  # a new model: prepare it, leave the previous one as it is
            self.quantizer, self._step_optimizer, self._frozen_checked = None, None, False
        guard_checkpoint(trainer, pl_module, self, self._check_checkpoint_options, lambda key: "fake_quant." in key)
        if self.quantizer is not None:
            return
        self.quantizer = EMAFakeQuantizer(pl_module, **self.options).prepare()
        self.report_coverage(trainer, self.quantizer.coverage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fsdp2:  # configure_model's fully_shard replaced the parameters with shards
            self._require_quantizer().rebind()
        steps = self._require_quantizer().parameters()
        lr = self.step_lr
        if lr is None and steps and trainer.optimizers:
            holders = [o for o in trainer.optimizers if any(p is q for g in o.param_groups for p in g["params"] for q in steps)]
            lr = 0.1 * (holders or trainer.optimizers)[0].param_groups[0]["lr"]
        self._step_optimizer = move_to_own_group(trainer, steps, lr, self.step_weight_decay)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        frozen = self.freeze_step is not None and step >= self.freeze_step
        quantizer = self._require_quantizer()
        if frozen and not self._frozen_checked:  # the first frozen step: every range must exist by now
            self._frozen_checked = True
            empty = [name for name, fq in quantizer.activation_quantizers().items()
                     if isinstance(fq, FakeLinearQuantization) and not fq.has_range and not fq.learned_step]  # fmt: skip
            if empty and self.options["activations"]:
                raise ValueError(
                    f"EMAFakeQuant(freeze_step={self.freeze_step}): the activation ranges are frozen at step {step} before "
                    f"{empty[:3]}{'...' if len(empty) > 3 else ''} tracked one, so they would let activations through in "
                    f"float, silently. Use freeze_step > start_step (={self.start_step}), or calibrate the ranges first "
                    "(HistogramCalibration)"
                )
        quantizer.set_state(enabled=step >= self.start_step, observe=not frozen)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.options["learned_step"] and (self.compiled or self.fsdp2 or pl_module.device.type != "cpu"):  # else the forward checks
            self._require_quantizer().check_finite()

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self.fsdp2 and self.options["learned_step"]:
            self._require_quantizer().write_back_steps()
        if self.freeze_step is not None and trainer.global_step >= self.freeze_step:
            for p in self._require_quantizer().parameters():  # frozen step sizes: no update
                p.grad = None

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._evaluation_state(trainer)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._evaluation_state(trainer)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_state(trainer)

    def _evaluation_state(self, trainer: pl.Trainer) -> None:
        # quantized evaluation as soon as training has reached start_step (ranges then exist)
        enabled = self.evaluate_quantized and trainer.global_step >= self.start_step
        self._require_quantizer().set_state(enabled=enabled)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.options["weights"]:  # the deployed size, every format's scales included
            quantizer = self._require_quantizer()
            size = quantizer.model_size()
            model_params = {id(p): p for n, p in pl_module.named_parameters() if "fake_quant." not in n}  # tied: once
            float_size = 4 * sum(p.numel() for p in model_params.values()) / 2**20
            pl_module.log("quant/true_model_size_mb", size, on_step=False, on_epoch=True)
            pl_module.log("quant/compression", float_size / size, on_step=False, on_epoch=True)
            pl_module.log("quant/true_avg_bits", quantizer.bits_per_weight(), on_step=False, on_epoch=True)
        collapsed = self._require_quantizer().collapsed_steps() if self.options["learned_step"] else {}
        if collapsed:
            group = self._step_optimizer.param_groups[-1]["lr"] if self._step_optimizer is not None else None
            rank_zero_warn(
                f"EMAFakeQuant: LSQ step sizes collapsed to their floor (1e-8) in {collapsed} (entries per quantizer): "
                f"those channels quantize to about zero and get no gradient, and an int8 runtime cannot hold their "
                f"biases. The step sizes' learning rate ({group}) is too high: lower step_lr"
            )
        quantizers = [q for q in self._require_quantizer().activation_quantizers().values()
                      if isinstance(q, FakeLinearQuantization) and q.iter_count > 0]  # tracked or learned ranges
        if not quantizers:
            return
        with torch.no_grad():
            pl_module.log("quant/act_range_min", torch.stack([q.tracked_min for q in quantizers]).min(), on_epoch=True)
            pl_module.log("quant/act_range_max", torch.stack([q.tracked_max for q in quantizers]).max(), on_epoch=True)
            scales = [1 / q.step if q.learned_step and q.step_initialized > 0 else q.scale for q in quantizers]
            pl_module.log("quant/act_scale_mean", torch.stack(scales).mean(), on_epoch=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"options": dict(self.options), "start_step": self.start_step, "freeze_step": self.freeze_step,
                "step_lr": self.step_lr, "step_weight_decay": self.step_weight_decay}  # fmt: skip

    def _check_checkpoint_options(self, state: dict[str, Any], warn: bool = False) -> None:
        options = state.get("options", {})
        check_resumed_options("EMAFakeQuant", {k: v for k, v in options.items() if k in self.STRUCTURAL_OPTIONS}, self.options,
                              self.STRUCTURAL_OPTIONS)  # fmt: skip
        if warn:  # ema_decay and the schedule: may change on resume
            current = {**self.options, **self.state_dict()}
            training = {k: v for k, v in options.items() if k not in self.STRUCTURAL_OPTIONS}
            training.update({k: state[k] for k in ("start_step", "freeze_step", "step_lr", "step_weight_decay") if k in state})
            check_resumed_options("EMAFakeQuant", training, current, ())

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_checkpoint_options(state_dict, warn=True)

    def _require_quantizer(self) -> EMAFakeQuantizer:
        if self.quantizer is None:
            raise RuntimeError("EMAFakeQuant has no quantizer yet: it is attached in setup(); use it through a Trainer")
        return self.quantizer


CALLBACK_OPTIONS = {
    "start_step": "first global step with quantization on (the ranges warm up before it)",
    "freeze_step": "global step from which the ranges (LSQ: the step sizes) are frozen; None: never; refused at that step "
                   "if a range was never tracked (calibrate first, or freeze later)",
    "step_lr": "learning rate of the LSQ step sizes (None: 0.1 x the optimizer's first group's lr)",
    "step_weight_decay": "weight decay of the LSQ step sizes",
}  # fmt: skip
EMAFakeQuant.__doc__ = (
    EMAFakeQuant.__doc__.replace("{options}", args_doc(FakeQuantConfig).lstrip())
    .replace("{callback_options}", "\n".join(f"        {k}: {v}" for k, v in CALLBACK_OPTIONS.items()).lstrip())
)
