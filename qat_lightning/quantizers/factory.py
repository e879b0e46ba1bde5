"""Quantizer modules for number formats: which module holds a format's state for a weight or an
activation. Formats whose scales come from the tensor itself (every registered format without a
range method) get a stateless :class:`FormatQuantizer`; Distiller's grids keep their range
modules (EMA-tracked or learned activations, current-range or learned weights). A format family
with state of its own registers its builders with :func:`register_quantizers`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..formats import NumberFormat, parse_format
from ..formats.distiller import DistillerFormat
from .activation import FakeLinearQuantization
from .weight import LearnedStepWeight, WeightRange

WeightBuilder = Callable[[NumberFormat, torch.Tensor, int], nn.Module]
ActivationBuilder = Callable[[NumberFormat, float], nn.Module]
_BUILDERS: dict[str, tuple[WeightBuilder, ActivationBuilder]] = {}


class FormatQuantizer(nn.Module):
    """Fake-quantizes its input to a format whose scales come from the tensor itself (no state).

    For a weight, ``channel_axis`` names its output-channel axis: the weight is seen as
    ``(channels, -1)`` (blocks and groups run along the flattened input, per-row scales are per
    output channel). For an activation (``channel_axis=None``) the format applies to the tensor as
    it is: rows, tokens, groups and blocks along its last dimension."""

    def __init__(self, fmt: NumberFormat | str, channel_axis: int | None = None) -> None:
        super().__init__()
        self.format = parse_format(fmt)
        self.channel_axis = channel_axis
        self.enabled = True
        self.label = type(self).__name__  # named in errors; the fake-quant transform sets where it sits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.channel_axis is None:
            return self._quantize(x)
        moved = x.movedim(self.channel_axis, 0) if self.channel_axis else x
        flat = moved.reshape(moved.shape[0], -1)
        out = self._quantize(flat).reshape(moved.shape)
        return out.movedim(0, self.channel_axis) if self.channel_axis else out

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.format.fake_quantize(x)
        except ValueError as error:
            raise ValueError(f"{self.label}: {error}") from None

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Bits a tensor of ``shape`` takes in the format, laid out as this quantizer sees it."""
        if self.channel_axis is None or not shape:
            return self.format.storage_bits(tuple(shape))
        channels = shape[self.channel_axis]
        return self.format.storage_bits((channels, max(1, int(torch.Size(shape).numel()) // max(channels, 1))))

    def check_weight(self, weight: torch.Tensor) -> None:
        """``ValueError`` if the weight cannot be held in the format (a block that does not divide)."""
        channels = weight.shape[self.channel_axis or 0] if weight.dim() else 1
        self.format.check_shape((channels, weight.numel() // max(channels, 1)))

    def extra_repr(self) -> str:
        return f"format={self.format.spec}" + ("" if self.channel_axis is None else f", channel_axis={self.channel_axis}")


def register_quantizers(family: str, weight: WeightBuilder, activation: ActivationBuilder) -> None:
    """Builders of the modules for a format family with state (a range to track or learn)."""
    _BUILDERS[family] = (weight, activation)


def weight_quantizer(fmt: NumberFormat | str, weight: torch.Tensor, axis: int) -> nn.Module:
    """The module that fake-quantizes ``weight`` (output channels along ``axis``) in ``fmt``."""
    fmt = parse_format(fmt)
    builders = _BUILDERS.get(fmt.family)
    if builders is not None:
        return builders[0](fmt, weight, axis)
    quantizer = FormatQuantizer(fmt, axis)
    quantizer.check_weight(weight)
    return quantizer


def activation_quantizer(fmt: NumberFormat | str, ema_decay: float = 0.999) -> nn.Module:
    """The module that fake-quantizes an activation in ``fmt`` (``ema_decay`` for tracked ranges)."""
    fmt = parse_format(fmt)
    builders = _BUILDERS.get(fmt.family)
    if builders is not None:
        return builders[1](fmt, ema_decay)
    return FormatQuantizer(fmt)


def _distiller_weight(fmt: DistillerFormat, weight: torch.Tensor, axis: int) -> nn.Module:
    if fmt.range_method == "ema":
        raise ValueError(f"{fmt.spec}: an EMA-tracked range is for activations; weights use their current range "
                         f"({fmt.spec.removesuffix('_ema')}) or a learned step (..._lsq)")  # fmt: skip
    channels, channel_axis = (weight.shape[axis], axis) if fmt.per_channel else (None, None)
    kind = LearnedStepWeight if fmt.range_method == "lsq" else WeightRange
    return kind(channels, fmt.bits, fmt.mode, channel_axis).to(weight.device)


def _distiller_activation(fmt: DistillerFormat, ema_decay: float) -> nn.Module:
    if fmt.range_method == "current":
        return FormatQuantizer(fmt)  # the range of each batch
    return FakeLinearQuantization(fmt.bits, fmt.mode, ema_decay, learned_step=fmt.range_method == "lsq")


register_quantizers("distiller", _distiller_weight, _distiller_activation)
__all__ = ["FormatQuantizer", "activation_quantizer", "register_quantizers", "weight_quantizer"]
