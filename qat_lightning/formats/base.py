"""What every number format provides: scales chosen from the tensor, quantize-dequantize over them,
the straight-through gradient, and the storage a tensor needs in the format.

A format is a small frozen dataclass named by a spec string (``"int4_g32"``, ``"mxfp4"``; see
:mod:`qat_lightning.formats.registry`). ``fake_quantize(x)`` is the QAT op: its value is what the
deployed kernel computes, its gradient is 1 where the value lies on the format's grid (inside the
representable range) and 0 where it was clipped.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

SCALE_BITS = 32  # a float32 scale per block, unless the format says otherwise


class NumberFormat(ABC):
    """A number format: the grid a tensor is mapped to and the scales that place it.

    Subclasses implement :meth:`choose_scales` (from the tensor itself: every format here is
    dynamic, range methods that track or learn scales live in the quantizer modules) and
    :meth:`quantize_dequantize` (the values on the grid, and where the input was inside it)."""

    spec: str
    bits: int  # bits per stored element
    dynamic: ClassVar[bool] = True  # scales from the tensor at every call: no range to track
    family: ClassVar[str] = ""

    @abstractmethod
    def choose_scales(self, x: torch.Tensor) -> Any:
        """The quantization parameters for ``x`` (no gradient flows through them)."""

    @abstractmethod
    def quantize_dequantize(self, x: torch.Tensor, scales: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(values on the grid in x's dtype, mask)``: ``mask`` is True where ``x`` was inside the
        representable range (the straight-through gradient passes), None when it always is."""

    @abstractmethod
    def storage_bits(self, shape: tuple[int, ...]) -> int:
        """Bits a tensor of ``shape`` needs in this format: elements, scales and zero points."""

    @abstractmethod
    def levels(self) -> int:
        """The most distinct values one block (group, row, tensor) can take."""

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """``ValueError`` when a tensor of ``shape`` cannot be held in this format (e.g. a last
        dimension that is not a multiple of the block size)."""

    def bits_per_element(self, shape: tuple[int, ...]) -> float:
        """Storage per element, scales included (``int4_g32``: 4 + 32 / 32 = 5)."""
        return self.storage_bits(tuple(shape)) / max(math.prod(shape), 1)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` with scales chosen from ``x`` itself; straight-through gradient
        inside the representable range, zero where values were clipped."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{self.spec}: fake_quantize needs a floating-point tensor; got {type(x).__name__}")
        self.check_shape(tuple(x.shape))
        return _StraightThrough.apply(x, self)

    def __str__(self) -> str:
        return self.spec


class _StraightThrough(torch.autograd.Function):
    """One node: the format's quantize-dequantize, gradient passed where the mask allows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:  # type: ignore[override]
        with torch.no_grad():
            values, mask = fmt.quantize_dequantize(x, fmt.choose_scales(x))
        if mask is not None:
            ctx.save_for_backward(mask)
        ctx.masked = mask is not None
        return values

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.masked:
            return grad, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None


@dataclass(frozen=True)
class Rows:
    """How a format lays a tensor out as rows that each get one scale: ``view`` of the tensor as
    (rows, columns) and back. ``kind`` is ``"tensor"``, ``"channel"`` (dim 0, the rest
    flattened), ``"row"`` (the last dimension) or ``"block"`` (``size`` consecutive elements of
    the last dimension)."""

    kind: str
    size: int = 0

    def view(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "tensor":
            return x.reshape(1, -1)
        if self.kind == "channel":
            return x.reshape(x.shape[0] if x.dim() else 1, -1)
        if self.kind == "row":
            return x.reshape(-1, x.shape[-1] if x.dim() else 1)
        return x.reshape(-1, self.size)

    def count(self, shape: tuple[int, ...]) -> int:
        """How many scales a tensor of ``shape`` gets."""
        numel = math.prod(shape)
        if self.kind == "tensor" or not shape:
            return 1
        if self.kind == "channel":
            return shape[0]
        if self.kind == "row":
            return numel // shape[-1] if shape[-1] else 0
        return numel // self.size

    def check(self, spec: str, shape: tuple[int, ...]) -> None:
        if self.kind == "block" and (not shape or shape[-1] % self.size):
            raise ValueError(
                f"{spec}: the last dimension ({shape[-1] if shape else 'none'}, shape {tuple(shape)}) is not a multiple of "
                f"the block size {self.size}; pick a format with a block size that divides it, or keep this tensor float"
            )
