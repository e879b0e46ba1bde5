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


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with explicit Linear layers (attention projections and MLP)."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads; got dim={dim}, heads={heads}")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    """A small vision-transformer-style classifier for 1-D signals: patches -> tokens -> blocks -> mean -> head."""

    def __init__(self, length: int = 40, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        if length % patch:
            raise ValueError(f"length must be a multiple of patch; got length={length}, patch={patch}")
        self.patch = patch
        self.embed = nn.Linear(patch, dim)
        self.position = nn.Parameter(torch.zeros(1, length // patch, dim))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(1))
