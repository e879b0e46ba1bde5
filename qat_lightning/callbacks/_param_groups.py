"""Shared by the callbacks: their own param group (DiffQ's bits, LSQ's step sizes), resume checks,
hyper-parameters logged to the Trainer's loggers."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch

from .._optim import fused_options


def move_to_own_group(
    trainer: pl.Trainer, params: Sequence[torch.nn.Parameter], lr: float | None, weight_decay: float
) -> torch.optim.Optimizer | None:
    """Move ``params`` out of every optimizer's groups into a new group of the optimizer that held
    them (else the first), with ``lr`` (None: that optimizer's first group's lr) and ``weight_decay``;
    with Adam / AdamW the group uses the fused kernel (:func:`~qat_lightning._optim.fused_options`).

    LR schedulers built in ``configure_optimizers`` know only the user's groups: they are extended
    so that the new group follows the same schedule, as if it had been there from the start with
    its lr at fit start equal to ``lr``. Returns the optimizer, or None if there is nothing to do.
    """
    ids = {id(p) for p in params}
    if not trainer.optimizers or not ids:
        return None
    holders = [opt for opt in trainer.optimizers if any(id(p) in ids for g in opt.param_groups for p in g["params"])]
    optimizer = holders[0] if holders else trainer.optimizers[0]
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["params"][:] = [p for p in group["params"] if id(p) not in ids]
    reference = optimizer.param_groups[0]
    lr = reference["lr"] if lr is None else lr
    group_options = fused_options(optimizer, params)  # a few small tensors: one kernel each
    optimizer.add_param_group({"params": list(params), "lr": lr, "weight_decay": weight_decay, **group_options})
    group = optimizer.param_groups[-1]
    ratio = lr / reference["lr"] if reference["lr"] else 1.0
    for key, value in reference.items():  # e.g. OneCycleLR's max_lr, min_lr, max_momentum
        if key not in group:
            group[key] = value * ratio if key.endswith("_lr") else value
    for config in trainer.lr_scheduler_configs:
        _extend_scheduler(config.scheduler, optimizer, ratio, len(optimizer.param_groups) - 1)
    return optimizer


# a scheduler's lists with one entry per param group: learning rates (scaled for the new group) and
# the rest (copied): LambdaLR / MultiplicativeLR's lambdas, CyclicLR's momenta, ReduceLROnPlateau's floors
_PER_GROUP_LRS = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
_PER_GROUP_OTHER = ("lr_lambdas", "base_momentums", "max_momentums")


def _extend_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer, ratio: float, groups_before: int) -> None:
    """Give ``scheduler`` (and the schedulers a SequentialLR / ChainedScheduler holds) an entry for
    the group just added to ``optimizer``, copied from the first group's (learning rates x ``ratio``)."""
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    for child in getattr(scheduler, "_schedulers", ()):
        _extend_scheduler(child, optimizer, ratio, groups_before)
    for name in (*_PER_GROUP_LRS, *_PER_GROUP_OTHER):
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == groups_before and values:
            first = values[0]
            values.append(first * ratio if name in _PER_GROUP_LRS and isinstance(first, (int, float, torch.Tensor)) else first)


def init_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments in ``locals()`` (taken first thing in ``__init__``), loggable."""
    return {k: _loggable(v) for k, v in arguments.items() if k not in ("self", "__class__")}


def _loggable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):  # also OmegaConf's DictConfig (Hydra instantiation)
        return {str(k): _loggable(v) for k, v in value.items()}
    if isinstance(value, Sequence):  # also ListConfig
        return [_loggable(v) for v in value]
    return getattr(value, "__qualname__", None) or repr(value)


def log_hparams(trainer: pl.Trainer, callback: pl.Callback) -> None:
    """Log the callback's ``hparams`` once, as ``<CallbackName>/<argument>``, to every logger."""
    if getattr(callback, "_hparams_logged", False) or not trainer.loggers:
        return
    params = {f"{type(callback).__name__}/{k}": v for k, v in getattr(callback, "hparams", {}).items()}
    for logger in trainer.loggers:
        logger.log_hyperparams(params)
    callback._hparams_logged = True


SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
FSDP2 = "ModelParallelStrategy"


def is_fsdp2(trainer: pl.Trainer) -> bool:
    """Whether the Trainer shards parameters with FSDP2 (Lightning's ``ModelParallelStrategy``)."""
    return type(trainer.strategy).__name__ == FSDP2


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule, callback: pl.Callback) -> None:
    """Refuse, with the reason, the sharded strategies a callback cannot work with: FSDP2
    (``ModelParallelStrategy``) trains with the callbacks that quantize in the forward (each
    forward sees the gathered full tensors); the others need whole tensors outside a forward.
    ``torch.compile``d LightningModules train: the swap hooks are traced into the graph."""
    name = type(callback).__name__
    strategy = type(trainer.strategy).__name__
    supports = getattr(callback, "supports_fsdp2", False)
    if strategy == FSDP2 and supports:
        return
    if strategy in SHARDED_STRATEGIES:
        use = "strategy=ModelParallelStrategy (FSDP2: fully_shard in configure_model) or 'ddp'" if supports else "strategy='ddp' (or 'auto')"
        raise ValueError(
            f"{name} does not support strategy={strategy}: it shards every weight across ranks, while the "
            f"quantizer needs whole tensors (ranges, bits, noise per tensor) outside the forward. Use {use}"
        )
