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


def noise_source(
    noise: str, sampler: str, shape: tuple[int, ...], generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """What DiffQ's training noise is, ``source`` in ``p + (max - min) / (2**bits - 1) * source``, drawn
    from ``generator`` (None: torch's global RNG) as each sampler specifies, computed here from that
    specification: ``"torch"``: ``randn / 2`` or ``rand - 0.5``; ``"table"``: 64 random bits per
    int64 draw, read as 16-bit values ``k``: ``k`` signed ``/ 2**16`` (uniform), or the standard
    normal's quantile at ``(k unsigned + 0.5) / 2**16``, divided by the RMS of all 65 536 such
    quantiles, ``/ 2`` (gaussian); each value rounded once into ``dtype``."""
    from math import prod
    from statistics import NormalDist

    n = prod(shape)
    if sampler == "torch":
        if noise == "gaussian":
            return torch.randn(shape, generator=generator, dtype=dtype) / 2
        return torch.rand(shape, generator=generator, dtype=dtype) - 0.5
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(2**63), None, generator=generator)
    if noise == "uniform":
        return (words.view(torch.int16)[:n].double() / 2**16).to(dtype).view(shape)
    inv_cdf = NormalDist().inv_cdf
    quantiles = [inv_cdf((k + 0.5) / 2**16) for k in range(2**16)]
    rms = (sum(z * z for z in quantiles) / 2**16) ** 0.5
    values = torch.tensor([z / rms for z in quantiles], dtype=torch.float64).to(dtype)
    return (values[words.view(torch.uint16)[:n].long()] / 2).view(shape)
