"""Uniform quantization with one min/max range per tensor and a bit width per group.

The arithmetic follows the reference DiffQ order of operations (normalise to [0, 1], divide by
the step, round) so that our quantized weights equal the reference's bit for bit.

Precision: the math runs in float32 whatever the tensor's dtype (float64 for float64 tensors) and
the dequantized value is rounded once into the tensor's dtype. In float16 / bfloat16 the levels
themselves would be wrong: ``(p - min) / span / unit`` overflows the grid at 15 bits (level 2048
of bfloat16 at 11 bits) and is 1 ulp off at 8.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype quantization math runs in for tensors of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_range(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(min, max, max - min)`` of ``p`` as 0-d tensors, without a host sync.

    The span is computed in float64 and rounded once, like a Python-float subtraction would be.
    """
    mn, mx = torch.aminmax(p.detach())
    span = (mx.double() - mn.double()).to(p.dtype)
    return mn, mx, span


def uniform_quantize(p: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``p`` (shape ``(groups, group_size)``) over ``bits`` (shape ``(groups, 1)``, values 1..15).

    Returns ``(levels, min, max)``; levels are int16 in ``[0, 2**bits - 1]``, min and max 0-d tensors
    in :func:`compute_dtype` (exact: they are entries of ``p``). A constant tensor quantizes to
    level 0 everywhere instead of dividing by a zero range.
    """
    x = p.detach().to(compute_dtype(p.dtype))
    mn, mx = torch.aminmax(x)
    span = (mx.double() - mn.double()).to(x.dtype)
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    unit = 1 / (2 ** bits.to(x.dtype) - 1)
    levels = ((x - mn) / safe_span / unit).round()
    return levels.to(torch.int16), mn, mx


def uniform_dequantize(
    levels: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`uniform_quantize`: ``min + levels / (2**bits - 1) * (max - min)``, computed in
    :func:`compute_dtype` of ``dtype`` and rounded once into ``dtype``."""
    work = compute_dtype(dtype)
    span = (mx.double() - mn.double()).to(work)
    unit = 1 / (2 ** bits.to(work) - 1)
    return (levels.to(work) * unit * span + mn.to(work)).to(dtype)
