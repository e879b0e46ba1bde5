"""Small networks for MNIST-1D (input: a batch of 40-sample signals)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """``in_features -> hidden... -> num_classes`` with ReLU; the MNIST-1D default is 40-512-512-10."""

    def __init__(self, in_features: int = 40, hidden: Sequence[int] = (512, 512), num_classes: int = 10) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class CNN1D(nn.Module):
    """Three strided 1-D convolutions and a linear head (the MNIST-1D paper's small CNN shape)."""

    def __init__(self, length: int = 40, channels: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )  # fmt: skip
        out_length = length
        for _ in range(3):
            out_length = (out_length + 1) // 2
        self.head = nn.Linear(channels * out_length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))
