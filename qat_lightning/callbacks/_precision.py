"""Lightning's precision plugins and the quantizers: state that stays float32, batches converted
as the training loop converts them, and precisions a callback refuses with the reason."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import lightning.pytorch as pl
import torch

HALF_PRECISIONS = ("16-true", "bf16-true")


def precision(trainer: pl.Trainer) -> str:
    return str(getattr(trainer.precision_plugin, "precision", "32-true"))


def keep_float32_through_conversion(trainer: pl.Trainer, owner: object, tensors: Callable[[], Iterable[torch.Tensor]]) -> None:
    """Keep ``tensors()`` (e.g. DiffQ's bits logits) float32, with their exact values, when the
    precision plugin converts the LightningModule (``precision="bf16-true" | "16-true" | "64-true"``
    run ``module.to(dtype)`` in ``strategy.setup``, after the callbacks' ``setup``, before the
    optimizers and their checkpointed state exist): the plugin's ``convert_module`` is wrapped
    once, and each owner's tensors are put back after the conversion. In bfloat16 a logit moves
    by its ulp (1/128 near 1) or not at all under Adam's updates."""
    plugin = trainer.precision_plugin
    keepers: dict[int, Callable[[], Iterable[torch.Tensor]]] | None = plugin.__dict__.get("_qat_lightning_float32")
    if keepers is None:
        keepers = plugin.__dict__["_qat_lightning_float32"] = {}
        convert = plugin.convert_module

        def convert_module(module: torch.nn.Module) -> torch.nn.Module:
            kept = [(t, t.detach()) for provide in keepers.values() for t in provide() if t.dtype == torch.float32]
            module = convert(module)
            for tensor, original in kept:  # the original storage: exact float32 values
                if tensor.dtype != torch.float32:
                    tensor.data = original.to(device=tensor.device)
            return module

        plugin.convert_module = convert_module  # type: ignore[method-assign]
    keepers[id(owner)] = tensors


def converted_batches(trainer: pl.Trainer, loader: Iterable[Any]) -> Iterable[Any]:
    """``loader``'s batches as the training loop hands them to the model: on the strategy's
    device and converted by the precision plugin (float64 under ``"64-true"``, bfloat16 under
    ``"bf16-true"``). Re-iterable."""

    class _Converted:
        def __iter__(self) -> Iterator[Any]:
            for batch in loader:
                yield trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))

        def __len__(self) -> int:
            return len(loader)  # type: ignore[arg-type]

    return _Converted()


def forward_context(trainer: pl.Trainer) -> AbstractContextManager:
    """The precision plugin's forward context (autocast for ``*-mixed``, the default dtype for ``*-true``)."""
    return trainer.precision_plugin.forward_context()


def refuse_precisions(trainer: pl.Trainer, callback: object, refused: Iterable[str], reason: str) -> None:
    """``ValueError`` in ``setup`` naming the callback, the precision and why."""
    name = precision(trainer)
    if name in tuple(refused):
        raise ValueError(f"{type(callback).__name__} does not support Trainer(precision={name!r}): {reason}")
