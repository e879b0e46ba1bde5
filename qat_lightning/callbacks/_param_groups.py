"""Shared by the callbacks: their own param group (DiffQ's bits, LSQ's step sizes), resume checks."""
from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from ..core._optim import fused_options


def move_to_own_group(
    trainer: pl.Trainer, params: Sequence[torch.nn.Parameter], lr: float | None, weight_decay: float
) -> torch.optim.Optimizer | None:
    """Move ``params`` out of every optimizer's groups into a new group of the optimizer that held
    them (else the first), with ``lr`` (None: that optimizer's first group's lr) and ``weight_decay``;
    with Adam / AdamW the group uses the fused kernel (:func:`~qat_lightning.core._optim.fused_options`).

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
        scheduler = config.scheduler
        if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs.append(scheduler.base_lrs[0] * ratio)
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr.append(group["lr"])
    return optimizer


def warn_on_changed_options(callback: str, saved: dict, current: dict) -> None:
    """Warn when a run resumes with options that differ from those its checkpoint was written with."""
    changed = sorted(k for k in saved if saved[k] != current.get(k))
    if changed:
        rank_zero_warn(f"{callback}: resuming with options that differ from the checkpoint's: {changed}")
