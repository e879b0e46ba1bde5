"""Uniform quantization with one min/max range per tensor and a bit width per group.

The arithmetic follows the reference DiffQ order of operations (normalise to [0, 1], divide by
the step, round) so that our quantized weights equal the reference's bit for bit.
"""
from __future__ import annotations

import torch


def tensor_range(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(min, max, max - min)`` of ``p`` as 0-d tensors, without a host sync.

    The span is computed in float64 and rounded once, like a Python-float subtraction would be.
    """
    mn, mx = torch.aminmax(p.detach())
    span = (mx.double() - mn.double()).to(p.dtype)
    return mn, mx, span


def uniform_quantize(p: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``p`` (shape ``(groups, group_size)``) over ``bits`` (shape ``(groups, 1)``, values 1..15).

    Returns ``(levels, min, max)``; levels are int16 in ``[0, 2**bits - 1]``. A constant tensor
    quantizes to level 0 everywhere instead of dividing by a zero range.
    """
    mn, mx, span = tensor_range(p)
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    unit = 1 / (2 ** bits.to(p.dtype) - 1)
    levels = ((p.detach() - mn) / safe_span / unit).round()
    return levels.to(torch.int16), mn, mx


def uniform_dequantize(
    levels: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`uniform_quantize`: ``min + levels / (2**bits - 1) * (max - min)``."""
    span = (mx.double() - mn.double()).to(dtype)
    unit = 1 / (2 ** bits.to(dtype) - 1)
    return levels.to(dtype) * unit * span + mn.to(dtype)
