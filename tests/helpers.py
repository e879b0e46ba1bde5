"""Tiny Lightning setups shared by the callback tests."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from qat_lightning.demo import MLP, Classifier


def tiny_model(**kwargs: Any) -> Classifier:
    torch.manual_seed(0)
    return Classifier(MLP(in_features=16, hidden=(32,), num_classes=8), num_classes=8, **kwargs)


def tiny_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.randint(0, 8, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def tiny_trainer(tmp_path: Any = None, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    if tmp_path is not None:
        options["default_root_dir"] = str(tmp_path)
    options.update(kwargs)
    return pl.Trainer(**options)


def set_widths(quantizer: Any, widths: list[int]) -> None:
    """Force a DiffQuantizer's rounded bits, group by group, cycling through ``widths``."""
    with torch.no_grad():
        for qp in quantizer.quantized_params():
            target = torch.tensor(widths, dtype=torch.float32).repeat(qp.logit.numel() // len(widths) + 1)[: qp.logit.numel()]
            t = ((target - quantizer.min_bits) / (quantizer.max_bits - quantizer.min_bits)).clamp(1e-6, 1 - 1e-6)
            qp.logit.copy_(torch.log(t / (1 - t)))
