"""Lightning callback ``AdaScale``: AdaScale post-training weight quantization at fit start or before eval."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from .._validate import check_bool, check_forward_fn, check_module_types, check_number, check_patterns
from ..calibration.adascale import AdaScaleResult, apply_adascale, frozen_weight_quantizer
from ..quantizers.fake_quantizer import EMAFakeQuantizer

from ._param_groups import init_arguments
from .base import QuantizationCallback
from ._resume import attached_elsewhere, check_resumed_options, guard_checkpoint
from ._precision import converted_batches, forward_context


class AdaScale(QuantizationCallback):
    """Post-training quantization of the weights with AdaScale (FlexRound + learnable clipping).

    ::

        Trainer(callbacks=[AdaScale(bits=4, num_batches=32, num_iterations=500)]).validate(model, data)  # PTQ
        Trainer(max_epochs=2, callbacks=[AdaScale(bits=4)]).fit(model, data)   # PTQ, then a short fine-tune

    * ``setup``: installs the weight quantizers (one frozen step size per output channel of every
      Linear / Conv1d / Conv2d) so that checkpoints load into the same structure.
    * ``on_train_start`` (fit) or the start of ``validate`` / ``test`` without a fit: runs
      :func:`~qat_lightning.calibration.adascale.apply_adascale` on ``num_batches`` training batches (validation /
      test batches if the datamodule has no training data), once; the flag is checkpointed. The
      weights are changed in place and the scales frozen; a following fine-tune trains the weights
      on that fixed grid. Logs ``adascale/<block>/loss_before`` and ``.../loss_after``.
    * Activations stay float unless ``EMAFakeQuant(weights=False)`` is added.

    Args:
        bits: weight bit width (2..8).
        num_batches: calibration batches.
        num_epochs: passes over them per block (AIMET's entry point); ``num_iterations`` overrides.
        num_iterations: optimizer steps per block (AIMET's default 1500).
        lr, scale_lr: Adam learning rates of gamma/beta and of s2/s3/s4.
        fp_input_mix: 0 feeds each block the quantized model's activations, 1 the float model's.
        block_types: module types treated as blocks (default: TransformerEncoderLayer, children of
            Sequential/ModuleList, and single layers elsewhere).
        forward_fn: ``(module, batch) -> output``; default ``module(batch[0])`` for tuples/lists.
        progress: progress bar over blocks.
        exclude: fnmatch patterns of module or parameter names kept float (``["*lm_head*"]``); a
            tied tensor by any of its names.
    """

    def __init__(
        self,
        bits: int = 4,
        num_batches: int = 32,
        num_epochs: int = 1,
        num_iterations: int | None = None,
        lr: float = 1e-3,
        scale_lr: float = 5e-4,
        fp_input_mix: float = 0.0,
        block_types: Sequence[type[torch.nn.Module]] | None = None,
        forward_fn: Callable[[Any, Any], Any] | None = None,
        progress: bool = True,
        exclude: Sequence[str] = (),
    ) -> None:
        self.hparams = init_arguments(locals())  # logged once to the Trainer's loggers
        self.bits = check_number("bits", bits, low=2, high=8, integer=True)
        self.num_batches = check_number("num_batches", num_batches, low=1, integer=True)
        self.num_epochs = check_number("num_epochs", num_epochs, low=1, integer=True)
        if num_iterations is not None:
            check_number("num_iterations", num_iterations, low=1, integer=True)
        self.num_iterations = num_iterations
        self.lr = check_number("lr", lr, low=0, low_open=True)
        self.scale_lr = check_number("scale_lr", scale_lr, low=0, low_open=True)
        self.fp_input_mix = check_number("fp_input_mix", fp_input_mix, low=0, high=1)
        self.block_types = check_module_types("block_types", block_types)
        self.forward_fn = check_forward_fn(forward_fn)
        self.progress = check_bool("progress", progress)
        self.exclude = check_patterns("exclude", exclude)
        self.done = False
        self.result: AdaScaleResult | None = None
        self.quantizer: EMAFakeQuantizer | None = None

    order = 20  # after rescaling, before the calibration of activation ranges
    conflict_hint = "AdaScale quantizes the weights after the fact: use EMAFakeQuant(weights=False) for activations"

    @override
    def quantizes(self) -> frozenset[str]:
        return frozenset({"weights"})

    @override
    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        quantizers = list(self.quantizer.weight_quantizers().values()) if self.quantizer is not None else []
        states = [(q, q.enabled) for q in quantizers]
        for q in quantizers:
            q.enabled = False
        try:
            yield
        finally:
            for q, enabled in states:
                q.enabled = enabled

    @override
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if attached_elsewhere(self, pl_module):  # a new model: quantize it too
            self.quantizer, self.result, self.done = None, None, False
        guard_checkpoint(trainer, pl_module, self, self._check_checkpoint_options, lambda key: "weight_fake_quant." in key)
        if self.quantizer is None:  # the structure a checkpoint of this run has; filled by apply_adascale
            self.quantizer = frozen_weight_quantizer(pl_module, self.bits, self.exclude)
            self.report_coverage(trainer, self.quantizer.coverage)
            for p in self.quantizer.parameters():
                p.requires_grad_(False)  # frozen encodings

    @override
    def _on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, trainer.train_dataloader)

    @override
    def _on_evaluation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._run(trainer, pl_module, self._eval_data(trainer, "val_dataloaders" if stage == "validate" else "test_dataloaders"))

    def _eval_data(self, trainer: pl.Trainer, attribute: str) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            try:
                return datamodule.train_dataloader()
            except Exception:  # noqa: BLE001 - a datamodule without training data: use the stage's batches
                pass
        loaders = getattr(trainer, attribute)
        return loaders[0] if isinstance(loaders, (list, tuple)) else loaders

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any) -> None:
        if self.done:
            return
        if loader is None:
            raise ValueError("AdaScale: no dataloader to calibrate on")
        assert self.quantizer is not None
        self.quantizer.remove()  # apply_adascale installs its own, with the same structure
        with forward_context(trainer):
            self.result = apply_adascale(
                pl_module, converted_batches(trainer, loader), self.forward_fn, self.num_epochs,
                num_iterations=self.num_iterations, num_batches=self.num_batches, bits=self.bits,
                block_types=self.block_types, lr=self.lr, scale_lr=self.scale_lr, fp_input_mix=self.fp_input_mix,
                device=pl_module.device, progress=self.progress, exclude=self.exclude,
            )  # fmt: skip
        self.quantizer = self.result.quantizer
        if self.result.coverage is not None:
            self.report_coverage(trainer, self.result.coverage)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each rank optimised on its own shard: every rank takes rank 0's weights and scales
            with torch.no_grad():
                for tensor in pl_module.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
        self.done = True
        metrics = {}
        for block in self.result.blocks:
            metrics[f"adascale/{block.name}/loss_before"] = block.loss_before
            metrics[f"adascale/{block.name}/loss_after"] = block.loss_after
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        lines = [f"  {b.name or '<root>'}: {b.loss_before:.4g} -> {b.loss_after:.4g}" for b in self.result.blocks]
        rank_zero_info("AdaScale block losses (round-to-nearest -> AdaScale):\n" + "\n".join(lines))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes its TrainerFn enum
        if stage in ("validate", "test") and not self.done and not trainer.sanity_checking:
            raise ValueError(
                f"AdaScale: trainer.{stage}() ran no batch (an empty dataloader, or limit_{'val' if stage == 'validate' else 'test'}"
                "_batches=0): nothing was quantized or evaluated. Pass calibration data"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "bits": self.bits, "exclude": list(self.exclude), "num_batches": self.num_batches, "num_epochs": self.num_epochs,
                "num_iterations": self.num_iterations, "lr": self.lr, "scale_lr": self.scale_lr, "fp_input_mix": self.fp_input_mix}  # fmt: skip

    def _check_checkpoint_options(self, state: dict[str, Any], warn: bool = False) -> None:
        options = {k: v for k, v in state.items() if k != "done"}
        current = self.state_dict()
        structural = ("bits", "exclude")
        check_resumed_options("AdaScale", {k: v for k, v in options.items() if k in structural}, current, structural)
        if warn and state.get("done"):  # optimised already: the checkpoint's weights and scales stay
            check_resumed_options("AdaScale", {k: v for k, v in options.items() if k not in structural}, current, ())

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_checkpoint_options(state_dict, warn=True)
        self.done = bool(state_dict.get("done", False))
