"""``InputScale``: a per-channel factor on a layer's input (SmoothQuant's ``1 / s`` where it cannot be
folded into the module that produces the input), applied by a forward pre-hook; a quantization
point of the fake-quant transform."""
from __future__ import annotations

import torch
from torch import nn

SCALE_NAME = "input_scale"


class InputScale(nn.Module):
    """Multiplies a layer's input by ``scale`` along the channel dimension (last for Linear, 1 for Conv)."""

    def __init__(self, channels: int, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("scale", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return x * self.scale.reshape(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, channel_dim={self.channel_dim}"


def _scale_input(module: nn.Module, args: tuple) -> tuple:
    return (module._modules[SCALE_NAME](args[0]), *args[1:])
