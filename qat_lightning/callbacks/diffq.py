"""Lightning callback ``DiffQ``: a thin adapter that drives :class:`~qat_lightning.quantizers.diffq.DiffQuantizer`."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict
from os import PathLike
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from .._options import args_doc, declared
from .._validate import check_bool, check_number
from ..quantizers.diffq import DiffQConfig, DiffQuantizer
from ..quantizers.noise_rng import MAX_SEED
from ..export.packing import packed_state, write_packed
from ..app.plots import format_layer_table, plot_layer_bits
from ._precision import keep_float32_through_conversion
from ._param_groups import init_arguments, move_to_own_group
from .base import QuantizationCallback
from ._resume import attached_elsewhere, check_resumed_options, guard_checkpoint


class DiffQ(QuantizationCallback):
    """Quantization-aware training with DiffQ: learned bits, a model-size penalty, quantized eval.

    Add it to the ``Trainer``; the LightningModule stays as it is::

        trainer = Trainer(callbacks=[DiffQ(penalty=5.0, bits_lr=3e-2)])
        trainer.fit(model, datamodule)

    What it does, hook by hook:

    * ``setup``: attaches a :class:`DiffQuantizer` to the LightningModule (so the bits exist before
      ``configure_optimizers`` and before a checkpoint's weights are loaded).
    * ``on_fit_start``: moves the bits into their own param group of the optimizer that holds
      them (``bits_lr``, ``bits_weight_decay``); LR schedulers scale that group like the others.
    * training: the gradient of ``penalty * model_size()`` reaches the bits inside the backward
      (:attr:`DiffQuantizer.size_penalty`, divided by ``accumulate_grad_batches``);
      ``on_before_optimizer_step`` (after AMP unscaling, before clipping) adds it to bits of layers
      the step did not use and logs ``quant/model_size_mb``, ``quant/avg_bits``,
      ``quant/penalty`` every step; ``on_train_epoch_end`` logs ``quant/true_model_size_mb`` and
      ``quant/compression``.
    * ``target_bits``: when the bits stop being learned (the switch to the straight-through
      phase, else the end of ``fit``) every bits logit is moved by one common amount to the
      largest size within the budget (:meth:`DiffQuantizer.fit_budget`).
    * validation, test and predict run on the true quantized weights, swapped in once when the
      stage starts and restored bit-identically when it ends (``quantize_eval=False`` keeps float).
    * ``quantize_on_fit_end=True`` leaves the model holding its quantized weights after ``fit``.
    * ``export_path``: at the end of ``fit`` the bit-packed model is written there (safetensors, see
      :func:`~qat_lightning.export.packing.save_quantized`); a relative path is taken inside the
      trainer's ``log_dir`` (or ``default_root_dir``).

    Args (the callback's own; default in the signature):

    {callback_options}

    The quantizer's options (declared once in :class:`~qat_lightning.DiffQConfig`):

    {options}
    """

    def __init__(
        self,
        penalty: float = 1.0,
        target_bits: float | None = None,
        group_size: int = 8,
        min_size: float = 0.01,
        float16: bool = False,
        scale: str = "tensor",
        scale_group_size: int = 32,
        scale_dtype: str = "float16",
        symmetric_ranges: bool = False,
        range_search: int = 0,
        learn_ranges: bool = False,
        min_bits: float = 2,
        max_bits: float = 15,
        param: str = "bits",
        noise: str = "gaussian",
        noise_sampler: str = "auto",
        init_bits: float = 8,
        extra_bits: float = 0,
        suffix: str = "_diffq",
        exclude: Sequence[str] = (),
        include: Sequence[str] | None = None,
        detect_bound: bool = True,
        bits_lr: float = 1e-3,
        bits_weight_decay: float = 0.0,
        straight_through_fraction: float = 0.0,
        range_lr: float | None = None,
        dampening: float = 0.0,
        quantize_eval: bool = True,
        quantize_on_fit_end: bool = False,
        export_path: str | None = None,
        layer_report: str | None = None,
        seed: int | None = None,
    ) -> None:
        arguments = locals()
        self.hparams = init_arguments(arguments)  # logged once to the Trainer's loggers
        self.penalty = check_number("penalty", penalty, low=0)
        self.target_bits = None if target_bits is None else check_number("target_bits", target_bits, low=0, low_open=True, high=32)
        self.bits_lr = check_number("bits_lr", bits_lr, low=0, low_open=True)
        self.bits_weight_decay = check_number("bits_weight_decay", bits_weight_decay, low=0)
        self.straight_through_fraction = check_number("straight_through_fraction", straight_through_fraction, low=0, high=1)
        self._straight_through_step: int | None = None
        self.range_lr = None if range_lr is None else check_number("range_lr", range_lr, low=0, low_open=True)
        self.dampening = check_number("dampening", dampening, low=0)
        if self.dampening and not self.straight_through_fraction:
            raise ValueError(f"DiffQ(dampening={dampening}) damps the rounding oscillations of the straight-through phase: set "
                             "straight_through_fraction > 0 (e.g. 0.8), or dampening=0")  # fmt: skip
        self._phase_steps: tuple[int, int] | None = None
        if learn_ranges is True and not self.straight_through_fraction:
            raise ValueError("learn_ranges=True learns the ranges in the straight-through phase: set straight_through_fraction > 0 "
                             "(e.g. 0.3)")  # fmt: skip
        self.quantize_eval = check_bool("quantize_eval", quantize_eval)
        self.quantize_on_fit_end = check_bool("quantize_on_fit_end", quantize_on_fit_end)
        if export_path is not None and not isinstance(export_path, (str, PathLike)):
            raise ValueError(f"export_path must be a file path or None; got {export_path!r}")
        self.export_path = export_path
        if layer_report is not None and not isinstance(layer_report, (str, PathLike)):
            raise ValueError(f"layer_report must be a file path (.png) or None; got {layer_report!r}")
        self.layer_report = layer_report
        self.seed = None if seed is None else check_number("seed", seed, low=0, high=MAX_SEED, integer=True)
        self._pending_rng: dict[str, torch.Tensor] | None = None
        self.exported: Path | None = None
        self.config = DiffQConfig(**{name: arguments[name] for name in declared(DiffQConfig)})
        self.quantizer: DiffQuantizer | None = None
        self._bits_optimizer: torch.optim.Optimizer | None = None
        self._swapped_for_stage = False

    # ----------------------------------------------------------------------------- structure
    # options that define the quantized tensors: a checkpoint must be resumed / evaluated with the same
    STRUCTURAL_OPTIONS = ("min_size", "float16", "group_size", "scale", "scale_group_size", "scale_dtype",
                          "symmetric_ranges", "range_search", "learn_ranges", "min_bits", "max_bits", "param", "extra_bits", "suffix",
                          "exclude", "include", "detect_bound")  # fmt: skip
    order = 10
    supports_fsdp2 = True
    conflict_hint = "use EMAFakeQuant(weights=False) next to DiffQ (DiffQ's weights, fake-quantized activations)"

    @override
    def quantizes(self) -> frozenset[str]:
        return frozenset({"weights"})

    @override
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        quantizer = self.quantizer
        if quantizer is None:
            yield
            return
        enabled, quantizer.enabled = quantizer.enabled, False
        try:
            yield
        finally:
            quantizer.enabled = enabled

    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if attached_elsewhere(self, pl_module):  # a new model: quantize it, leave the previous one as it is
            self.quantizer, self._bits_optimizer, self._pending_rng, self.exported = None, None, None, None
            self._swapped_for_stage = False
        guard_checkpoint(trainer, pl_module, self, self._check_checkpoint_options, lambda key: key.endswith(self.config.suffix))
        keep_float32_through_conversion(trainer, self, lambda: self.quantizer.parameters() if self.quantizer is not None else [])
        if self.quantizer is None:
            self.quantizer = self.build_quantizer(pl_module)
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.quantizer.seed_noise(seed)
            rank_zero_info(
                f"DiffQ: {len(self.quantizer.quantized_params())} tensors quantized, "
                f"float size {self.quantizer.float_model_size():.4f} MB"
            )
            self.report_coverage(trainer, self.quantizer.coverage())
        if self.target_bits is not None:
            self._check_target(self.quantizer)

    def _check_target(self, quantizer: DiffQuantizer) -> None:
        """Refuse a ``target_bits`` below what the grid can store (every group at ``min_bits``)."""
        if not quantizer.quantized_params():
            raise ValueError(f"DiffQ(target_bits={self.target_bits}): nothing is quantized, so there is no size to budget "
                             "(see the coverage report); set target_bits=None")  # fmt: skip
        lowest = quantizer.stored_bits_if(self.smallest_width)
        if self.target_bits < lowest:
            raise ValueError(
                f"DiffQ(target_bits={self.target_bits}) is below the smallest size this grid stores: {lowest:.3f} bits per "
                f"weight with every group at {self.smallest_width} bits (min_bits={self.config.min_bits}, "
                f"extra_bits={self.config.extra_bits}), its ranges and headers included; raise target_bits, lower min_bits "
                "or store fewer ranges (scale='channel', symmetric_ranges=True, a larger scale_group_size)"
            )

    @property
    def smallest_width(self) -> int:
        """The fewest bits a group can be stored with: ``min_bits + extra_bits`` rounded (the bits
        stay above ``min_bits``)."""
        return min(max(math.floor(self.config.min_bits + self.config.extra_bits + 0.5), 1), 15)

    def build_quantizer(self, pl_module: pl.LightningModule) -> DiffQuantizer:
        """Create the quantizer; override to quantize only part of the module."""
        return DiffQuantizer(pl_module, **asdict(self.config))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fsdp2 and self.target_bits is not None:
            raise ValueError("DiffQ(target_bits=...) moves every bits logit by one amount found on the whole model: not "
                             "under FSDP2 yet; use penalty alone (sweep it for a size) or DDP")  # fmt: skip
        if self.fsdp2:  # configure_model's fully_shard replaced the parameters with shards
            if self.dampening:
                raise ValueError("DiffQ(dampening > 0) reads each weight's whole grid: not under FSDP2 yet; use dampening=0 "
                                 "or DDP")  # fmt: skip
            if self.config.learn_ranges:
                raise ValueError("DiffQ(learn_ranges=True) starts the ranges from whole weights: not under FSDP2 yet; use "
                                 "range_search (searched ranges work with FSDP2) or DDP")  # fmt: skip
            self._require_quantizer().rebind()
        if self._pending_rng is not None:
            self._require_quantizer().set_noise_rng_state(self._pending_rng)
            self._pending_rng = None
        self.setup_bits_param_group(trainer)
        # the penalty's gradient is added inside each backward through a noisy weight (no extra
        # pass over the bits); Lightning divides the loss of each accumulated batch the same way
        self._require_quantizer().size_penalty = self.penalty / trainer.accumulate_grad_batches
        self._straight_through_step = None
        if self.straight_through_fraction > 0:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError("DiffQ(straight_through_fraction > 0) needs a known number of training steps: set the "
                                 "Trainer's max_steps or max_epochs")  # fmt: skip
            self._straight_through_step = int(round((1 - self.straight_through_fraction) * total))
            self._phase_steps = (self._straight_through_step, int(total))

    def _update_phase(self, trainer: pl.Trainer) -> None:
        """Noise injection, then (the last ``straight_through_fraction`` of the steps) the true
        quantized weights through a straight-through estimator with the bits frozen. Decided by
        the global step alone, so a resumed run is in the same phase."""
        quantizer = self._require_quantizer()
        late = self._straight_through_step is not None and trainer.global_step >= self._straight_through_step
        if late != quantizer.straight_through:
            if late:  # the bits are final from here: bring them to the budget first
                self._fit_budget(trainer)
            quantizer.straight_through = late
            quantizer.size_penalty = 0.0 if late else self.penalty / trainer.accumulate_grad_batches
            if late:
                with quantizer.gathered():  # FSDP2: every rank switches at the same step and gathers
                    bits, stored = float(quantizer.average_bits(exact=True)), quantizer.stored_bits()
                rank_zero_info(f"DiffQ: step {trainer.global_step}: bits frozen at {bits:.2f} on average ({stored:.3f} stored "
                               "bits per weight); training on the true quantized weights (straight-through) from here")  # fmt: skip

    def _fit_budget(self, trainer: pl.Trainer) -> None:
        """``target_bits``: move the learned bits, by one common amount, to the budget."""
        quantizer = self._require_quantizer()
        if self.target_bits is None:
            return
        before = quantizer.stored_bits()
        shift = quantizer.fit_budget(self.target_bits)
        rank_zero_info(f"DiffQ: step {trainer.global_step}: bits brought to target_bits={self.target_bits}: "
                       f"{before:.3f} -> {quantizer.stored_bits():.3f} stored bits per weight (every bits logit {shift:+.3f})")  # fmt: skip

    def setup_bits_param_group(self, trainer: pl.Trainer) -> None:
        """Move the bits into their own param group (the optimizer that holds them, else the first)."""
        quantizer = self._require_quantizer()
        self._bits_optimizer = move_to_own_group(trainer, quantizer.parameters(), self.bits_lr, self.bits_weight_decay)
        ranges = [qp.ranges for qp in quantizer.quantized_params() if qp.ranges is not None]
        if ranges and trainer.optimizers:  # LSQ's default: a tenth of the weights' learning rate
            lr = self.range_lr if self.range_lr is not None else 0.1 * trainer.optimizers[0].param_groups[0]["lr"]
            move_to_own_group(trainer, ranges, lr, 0.0)

    # ----------------------------------------------------------------------------- training
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._update_phase(trainer)
        if self.compiled:  # the noise generators cannot be traced: draw the noisy weights now
            self._require_quantizer().prepare_compiled_step()
        else:
            self._require_quantizer().new_noise()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        quantizer = self._require_quantizer()
        if self.config.learn_ranges:  # ranges not started yet: their zero gradient is no step
            for qp in quantizer.quantized_params():
                if qp.ranges.grad is not None and quantizer.learned_ranges(qp) is None:
                    qp.ranges.grad = None
        if self.dampening and quantizer.straight_through:
            self.add_dampening_gradient(trainer, quantizer, optimizer)
        if optimizer is not self._bits_optimizer:
            return
        if quantizer.straight_through:  # bits frozen: no gradient, no penalty (Adam skips them)
            for logit in quantizer.parameters():
                logit.grad = None
        elif self.penalty > 0 and any(p.requires_grad and p.grad is None for p in quantizer.parameters()):
            self.add_penalty_gradient(quantizer, only_missing=True)  # bits of layers this step did not use
        if _metrics_reach_loggers(trainer):  # self.log costs ~0.5 ms: skip steps Lightning would drop
            with torch.no_grad(), quantizer.gathered():
                size = quantizer.model_size()
                bits = quantizer.average_bits()
            if not torch.isfinite(size):  # NaN bits: name them now, not at the next validation
                quantizer.check_finite()
            pl_module.log("quant/model_size_mb", size, prog_bar=True, on_step=True, on_epoch=False)
            pl_module.log("quant/avg_bits", bits, prog_bar=True, on_step=True, on_epoch=False)
            pl_module.log("quant/penalty", self.penalty * size, on_step=True, on_epoch=False)

    def dampening_strength(self, step: int) -> float:
        """``dampening`` ramped by a cosine from 0 at the first straight-through step to its full
        value at the last step (Nagel et al. 2022 anneal it the same way)."""
        if self._phase_steps is None:
            return 0.0
        start, end = self._phase_steps
        progress = min(max((step - start) / max(end - 1 - start, 1), 0.0), 1.0)
        return self.dampening * (1 - math.cos(math.pi * progress)) / 2

    @torch.no_grad()
    def add_dampening_gradient(self, trainer: pl.Trainer, quantizer: DiffQuantizer, optimizer: torch.optim.Optimizer) -> None:
        """Oscillation dampening (Nagel et al. 2022, "Overcoming Oscillations in Quantization-Aware
        Training"): add the gradient of ``strength * mean(offset**2)`` over the quantized entries, the
        offset of each entry from its level in grid steps (:meth:`DiffQuantizer.rounding_pull`), to
        the weights this optimizer holds: latent weights stop flipping across a rounding boundary
        from step to step and settle at their level, where the straight-through estimator's
        forward is exact."""
        strength = self.dampening_strength(trainer.global_step)
        if strength <= 0:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}  # read each step: groups may be added
        qparams = quantizer.quantized_params()
        scale = 2 * strength / sum(qp.param.numel() for qp in qparams)
        for qp in qparams:
            if id(qp.param) in held and qp.param.grad is not None:
                qp.param.grad.add_(quantizer.rounding_pull(qp), alpha=scale)

    def add_penalty_gradient(self, quantizer: DiffQuantizer, only_missing: bool = False) -> None:
        """Add ``penalty * d model_size / d bits`` to the bits' ``.grad`` (the task gradient is
        already there); ``only_missing``: only to bits without a gradient."""
        for logit, grad in zip(quantizer.parameters(), quantizer.size_gradient()):
            if not logit.requires_grad or (only_missing and logit.grad is not None):
                continue
            if logit.grad is None:
                logit.grad = grad.mul_(self.penalty)
            else:
                logit.grad.add_(grad, alpha=self.penalty)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantizer = self._require_quantizer()
        with quantizer.gathered():
            true_size, bits = quantizer.true_model_size(), quantizer.average_bits(exact=True)
        pl_module.log("quant/true_model_size_mb", true_size, on_step=False, on_epoch=True)
        pl_module.log("quant/compression", quantizer.float_model_size() / true_size, on_step=False, on_epoch=True)
        pl_module.log("quant/true_avg_bits", bits, on_step=False, on_epoch=True)

    # ----------------------------------------------------------------------------- evaluation
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._enter_eval()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave_eval()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._enter_eval()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave_eval()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_eval()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave_eval()

    def _enter_eval(self) -> None:
        quantizer = self._require_quantizer()
        if self.quantize_eval and self.fsdp2:
            return  # FSDP2: the hooks quantize each gathered weight in eval forwards (no shard rewritten in place)
        if self.quantize_eval:
            self._swapped_for_stage = quantizer.quantize()
        else:
            quantizer.enabled = False

    def _leave_eval(self) -> None:
        quantizer = self._require_quantizer()
        if self._swapped_for_stage:
            quantizer.restore()
            self._swapped_for_stage = False
        quantizer.enabled = True

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        quantizer = self._require_quantizer()
        if not quantizer.straight_through:  # learned to the end (else: brought to the budget when they froze)
            self._fit_budget(trainer)
        quantizer.size_penalty = 0.0
        quantizer.straight_through = False
        with quantizer.gathered():  # FSDP2: whole tensors on every rank for the checks, the table and the file
            try:
                quantizer.check_finite()
            except FloatingPointError as error:
                where = f" ({self.export_path} not written; the last good checkpoint is the one to export)" if self.export_path else ""
                raise FloatingPointError(f"DiffQ at the end of fit: {error}{where}") from None
            stats = quantizer.layer_stats()
            rank_zero_info("DiffQ: bits per layer at the end of fit\n" + format_layer_table(stats))
            if self.layer_report is not None and trainer.is_global_zero:
                path = plot_layer_bits(stats, self._in_log_dir(trainer, self.layer_report))
                rank_zero_info(f"DiffQ: bits per layer drawn in {path}")
            if self.export_path is not None:
                self.export(trainer)
        if self.quantize_on_fit_end:
            if self.fsdp2:
                raise ValueError("DiffQ(quantize_on_fit_end=True) rewrites whole weights in place: not with FSDP2 shards; "
                                 "export the packed file (export_path) instead")  # fmt: skip
            quantizer.quantize()

    def export(self, trainer: pl.Trainer, path: str | PathLike | None = None) -> Path | None:
        """Write the bit-packed quantized model (rank 0 only); returns the path written."""
        target = self._in_log_dir(trainer, path if path is not None else self.export_path or "model.packed.safetensors")
        if self.fsdp2 or trainer.is_global_zero:  # FSDP2: every rank gathers the whole tensors
            state = packed_state(self._require_quantizer())
        if trainer.is_global_zero:
            size = write_packed(target, *state)
            rank_zero_info(f"DiffQ: bit-packed model written to {target} ({size / 2**20:.4f} MB)")
        self.exported = target
        return target

    @staticmethod
    def _in_log_dir(trainer: pl.Trainer, path: str | PathLike) -> Path:
        target = Path(path)
        return target if target.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / target

    # ----------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["exclude"] = list(config["exclude"])
        state = {
            "config": config,
            "penalty": self.penalty,
            "target_bits": self.target_bits,
            "bits_lr": self.bits_lr,
            "bits_weight_decay": self.bits_weight_decay,
            "straight_through_fraction": self.straight_through_fraction,
            "range_lr": self.range_lr,
            "dampening": self.dampening,
        }
        if self.quantizer is not None:
            state["noise_rng"] = self.quantizer.noise_rng_state()
        return state

    def _check_checkpoint_options(self, state: dict[str, Any], warn: bool = False) -> None:
        current = self.state_dict()
        structural = {k: v for k, v in state.get("config", {}).items() if k in self.STRUCTURAL_OPTIONS}
        check_resumed_options("DiffQ", structural, current["config"], self.STRUCTURAL_OPTIONS)
        if warn:  # init_bits, noise (config) and the bits group's lr / decay, the penalty
            training = {k: v for k, v in state.get("config", {}).items() if k not in self.STRUCTURAL_OPTIONS}
            training.update({k: state[k] for k in ("penalty", "target_bits", "bits_lr", "bits_weight_decay", "straight_through_fraction", "range_lr", "dampening") if k in state})
            check_resumed_options("DiffQ", training, {**current["config"], **current}, ())

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_checkpoint_options(state_dict, warn=True)
        rng = state_dict.get("noise_rng")
        if rng:
            if self.quantizer is not None:
                self.quantizer.set_noise_rng_state(rng)
            else:  # restored before setup: applied when the quantizer exists
                self._pending_rng = rng

    def _require_quantizer(self) -> DiffQuantizer:
        if self.quantizer is None:
            raise RuntimeError("DiffQ has no quantizer yet: it is attached in setup(); use it through a Trainer")
        return self.quantizer


CALLBACK_OPTIONS = {
    "penalty": "weight of the model size (MB) in the training objective",
    "target_bits": "a size budget in stored bits per quantized weight (payload, widths, ranges, headers): the "
                   "penalty shapes which groups get more bits; when the bits stop being learned (the switch to the "
                   "straight-through phase, else the end of fit) every bits logit is moved by one common amount, up or "
                   "down, to the largest size within the budget, so the model ends at it whatever the seed; None: the "
                   "size the penalty leads to (the reference). Refused below what the grid stores at min_bits",
    "bits_lr": "learning rate of the bits param group (the demo uses 1e-2)",
    "bits_weight_decay": "weight decay of the bits param group",
    "straight_through_fraction": "share of the training steps, at the end, that train on the true quantized weights "
                                 "(straight-through estimator) with the bits frozen, after noise injection (0 .. 1; 0: noise "
                                 "throughout, the reference)",
    "range_lr": "learning rate of the learned ranges' param group (learn_ranges; None: 0.1 x the optimizer's first "
                "group's lr, as LSQ's step sizes), no weight decay",
    "dampening": "oscillation dampening in the straight-through phase (Nagel et al. 2022): the strength of "
                 "dampening * mean(offset**2) added to the objective, offset the distance of each quantized entry from "
                 "its grid level in steps (entries beyond their range: none), ramped by a cosine from 0 at the switch to "
                 "its value at the last step; its gradient is added to the weights before each optimizer step. 0: off "
                 "(the reference); needs straight_through_fraction > 0",
    "quantize_eval": "validate / test / predict on the true quantized weights",
    "quantize_on_fit_end": "leave the true quantized weights in the model after fit",
    "export_path": "write the bit-packed model there at the end of fit (relative: inside the log dir; None: nowhere)",
    "layer_report": "draw the bits per layer and each layer's share of the size there (PNG) at the end of fit (relative: "
                    "inside the log dir; None: no picture; the table is logged always)",
    "seed": "seed of the training noise's own generator, whose state is checkpointed (exact resume); None: drawn from "
            "torch's global RNG at setup, so seed_everything governs it (alike on every DDP rank); 0 .. 2**63 - 1",
}  # fmt: skip
DiffQ.__doc__ = (
    DiffQ.__doc__.replace("{options}", args_doc(DiffQConfig).lstrip())
    .replace("{callback_options}", "\n".join(f"        {k}: {v}" for k, v in CALLBACK_OPTIONS.items()).lstrip())
)


def _metrics_reach_loggers(trainer: pl.Trainer) -> bool:
    """Whether step metrics logged now are written (every ``log_every_n_steps``), as Lightning's
    own monitors (``LearningRateMonitor``, ``DeviceStatsMonitor``) decide it."""
    connector = getattr(trainer, "_logger_connector", None)
    return True if connector is None else bool(connector.should_update_logs or trainer.fast_dev_run)
