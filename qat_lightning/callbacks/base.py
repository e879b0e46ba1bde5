"""The protocol every callback here follows, and the one place that orders the stack.

A :class:`QuantizationCallback` says what it quantizes (``quantizes``), what it offers to others
and needs from them (``provides`` / ``requires``: e.g. activation ranges to calibrate), where it
stands in the stack (``order``) and how to switch it off for a moment (:meth:`disabled`). The
Lightning hooks ``setup``, ``on_train_start``, ``on_validation_start`` and ``on_test_start`` of
the first such callback in ``Trainer(callbacks=...)`` run the whole stack's stage methods
(``_setup``, ``_on_train_start``, ``_on_evaluation_start``) in ``order``: whatever the order of the
list, rescaling is planned before quantizers attach and applied before calibration, weights are
post-training quantized before activation ranges are calibrated. No callback imports another:
conflicts, requirements and "switch the others off" are decided here.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..coverage import CoverageReport
from ._param_groups import check_trainer, is_fsdp2, log_hparams


class QuantizationCallback(pl.Callback):
    """Base of the qat_lightning callbacks; subclasses implement the ``_stage`` methods they need."""

    order: ClassVar[int] = 50  # structure (rescaling) 0, quantizers 10, post-training 20, calibration 30
    # a hint for the conflict message when two callbacks quantize the same thing
    conflict_hint: ClassVar[str] = ""
    coverage: CoverageReport | None = None  # what this callback quantizes, set at setup
    compiled: bool = False  # the LightningModule (or a submodule) is torch.compile'd; set at setup
    supports_fsdp2: ClassVar[bool] = False  # trains under ModelParallelStrategy (fully_shard)
    fsdp2: bool = False  # the Trainer shards with FSDP2 (ModelParallelStrategy); set at setup

    def quantizes(self) -> frozenset[str]:
        """What this callback quantizes: a subset of ``{"weights", "activations"}``."""
        return frozenset()

    def provides(self) -> frozenset[str]:
        """Capabilities offered to the rest of the stack (e.g. ``"activation_ranges"``)."""
        return frozenset()

    def requires(self) -> dict[str, str]:
        """Capabilities needed from the rest of the stack, each with the message if none offers it."""
        return {}

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside: this callback's quantization is off (ranges frozen), restored exactly on exit."""
        yield

    # ----------------------------------------------------------------------------- stage methods
    def _setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install the structure (quantizers, parameters) on ``pl_module``: before weights load."""

    def _on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Work done once the optimizers exist and the data is there, before the first step."""

    def _on_evaluation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """At the start of ``validate`` / ``test`` (``stage``) run without a fit: post-training work."""

    def report_coverage(self, trainer: pl.Trainer, report: CoverageReport) -> None:
        """Keep ``report`` as ``self.coverage``, log its table (rank 0) and its numbers to the
        Trainer's loggers, and warn naming the largest float weights past 5 % of the entries."""
        self.coverage = report
        rank_zero_info(report.table())
        message = report.warning()
        if message is not None:
            rank_zero_warn(message)
        for logger in trainer.loggers:
            logger.log_metrics(report.as_dict(), step=trainer.global_step)

    # ----------------------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _leads(self, trainer):
            Stack(trainer).setup(pl_module, stage)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _leads(self, trainer):
            for callback in Stack(trainer).callbacks:
                callback._on_train_start(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _leads(self, trainer) and trainer.state.fn == "validate":
            for callback in Stack(trainer).callbacks:
                callback._on_evaluation_start(trainer, pl_module, "validate")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _leads(self, trainer):
            for callback in Stack(trainer).callbacks:
                callback._on_evaluation_start(trainer, pl_module, "test")


def is_compiled(pl_module: pl.LightningModule) -> bool:
    """Whether ``pl_module`` (Lightning's ``torch.compile`` wrapper) or a submodule of it is compiled."""
    from torch._dynamo.eval_frame import OptimizedModule

    return getattr(pl_module, "_compiler_ctx", None) is not None or any(isinstance(m, OptimizedModule) for m in pl_module.modules())


def _leads(callback: QuantizationCallback, trainer: pl.Trainer) -> bool:
    """Whether ``callback`` is the first of the stack in the Trainer's list: its hooks run the stack."""
    first = next((c for c in trainer.callbacks if isinstance(c, QuantizationCallback)), None)
    return first is callback


class Stack:
    """The qat_lightning callbacks of a Trainer, in ``order`` (ties: the list's order)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        ours = [c for c in trainer.callbacks if isinstance(c, QuantizationCallback)]
        self.callbacks: list[QuantizationCallback] = sorted(ours, key=lambda c: (c.order, ours.index(c)))

    def setup(self, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse what cannot work (strategies, compiled modules, two callbacks on the same tensors,
        a missing requirement), then set every callback up in order."""
        for callback in self.callbacks:
            check_trainer(self.trainer, pl_module, callback)
            log_hparams(self.trainer, callback)
        self.check_conflicts()
        compiled, fsdp2 = is_compiled(pl_module), is_fsdp2(self.trainer)
        for callback in self.callbacks:
            callback.compiled, callback.fsdp2 = compiled, fsdp2
            callback._setup(self.trainer, pl_module, stage)
        if self.callbacks and compiled:
            # dynamo does not guard on module hooks (torch._dynamo.config.skip_nnmodule_hook_guards):
            # code compiled in this process before the quantizers' hooks were installed (an earlier
            # fit of the same class) would run without them, silently float. Compile afresh.
            torch._dynamo.reset()

    def check_conflicts(self) -> None:
        owners: dict[str, QuantizationCallback] = {}
        for callback in self.callbacks:
            for what in sorted(callback.quantizes()):
                other = owners.get(what)
                if other is not None:
                    hint = callback.conflict_hint or other.conflict_hint
                    raise ValueError(
                        f"{type(other).__name__} and {type(callback).__name__} would both quantize the {what}"
                        + (f": {hint}" if hint else ": keep one of them")
                    )
                owners[what] = callback
        offered = {capability for c in self.callbacks for capability in c.provides()}
        for callback in self.callbacks:
            for capability, message in callback.requires().items():
                if capability not in offered:
                    raise ValueError(message)

    def providing(self, capability: str) -> list[QuantizationCallback]:
        return [c for c in self.callbacks if capability in c.provides()]

    @contextlib.contextmanager
    def disabled(self, *, but: QuantizationCallback | None = None) -> Iterator[None]:
        """Every callback's quantization off inside (except ``but``): statistics of the float model."""
        with contextlib.ExitStack() as stack:
            for callback in self.callbacks:
                if callback is not but:
                    stack.enter_context(callback.disabled())
            yield


def of(trainer: pl.Trainer) -> Stack:
    """The stack of ``trainer``'s callbacks (for the callbacks' stage methods)."""
    return Stack(trainer)


__all__ = ["QuantizationCallback", "Stack", "of"]
