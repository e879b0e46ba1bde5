"""Other libraries' QAT as Lightning callbacks, for side-by-side comparisons in the app's
experiments (``experiment=lm_torchao_*``) and the benchmarks: not part of qat_lightning's API."""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from .._validate import check_choice, check_number, check_patterns


class TorchAOQAT(pl.Callback):
    """torchao's QAT (``quantize_(model, QATConfig(..., step="prepare"))``): int4 weights per group
    of ``group_size`` (symmetric, torchao's default), optionally int8 per-token asymmetric inputs,
    on every ``nn.Linear`` whose input width the group divides and whose name ``exclude`` does not
    match. Training and evaluation both run torchao's fake quantization.

    Size (:meth:`bits_per_weight`): 4 bits per weight plus a 16-bit scale and a 16-bit zero point
    per group, as torchao's int4 inference layouts store them (5.0 bits at group 32)."""

    def __init__(self, group_size: int = 32, activations: str | None = None, exclude: Sequence[str] = ()) -> None:
        self.group_size = check_number("group_size", group_size, low=1, integer=True)
        self.activations = check_choice("activations", activations, (None, "int8_per_token"))
        self.exclude = check_patterns("exclude", exclude)
        self.quantized: list[str] = []
        self._model: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._model is pl_module:
            return
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        weight = IntxFakeQuantizeConfig(torch.int4, group_size=self.group_size)
        activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False) if self.activations else None
        names = {id(m): n for n, m in pl_module.named_modules()}

        def fits(module: nn.Module, name: str) -> bool:
            name = names.get(id(module), name)
            ok = isinstance(module, nn.Linear) and module.in_features % self.group_size == 0
            return ok and not any(fnmatch.fnmatch(name, pattern) for pattern in self.exclude)

        self.quantized = [n for n, m in pl_module.named_modules() if fits(m, n)]
        self._numel = {n: m.weight.numel() for n, m in pl_module.named_modules() if n in self.quantized}
        self._float_bits = 32 * sum(p.numel() for p in pl_module.parameters()) - 32 * sum(self._numel.values())
        quantize_(pl_module, QATConfig(activation_config=activation, weight_config=weight, step="prepare"), filter_fn=fits)
        self._model = pl_module

    def bits_per_weight(self) -> float:
        """Stored bits per quantized weight, scales and zero points included."""
        return 4 + 32 / self.group_size

    def model_size(self) -> float:
        """MB: the quantized Linear weights at :meth:`bits_per_weight`, everything else fp32."""
        return (self._float_bits + self.bits_per_weight() * sum(self._numel.values())) / (8 * 2**20)
