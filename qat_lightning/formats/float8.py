"""FP8 formats as torchao computes them (``Float8FakeQuantizeConfig``, ``_choose_scale_float8``).

Spec ``fp8_e4m3`` / ``fp8_e5m2`` (one scale per tensor) and ``..._per_row`` (one per vector of the
last dimension):

* ``scale = max|x| / fp8_max`` (448 for E4M3, 57344 for E5M2), computed in the tensor's dtype and
  kept in float32; ``x_hat = fp8(clamp(x / scale, -fp8_max, fp8_max)) * scale`` in float32, rounded
  once into the tensor's dtype. The cast to FP8 rounds to nearest, ties to even (torch's cast).
* a block of zeros gets scale 1 and stays zero (torchao divides 0 by 0 there and returns NaN).
* gradient: 1 everywhere (nothing lies beyond ``max|x|``).
* storage: 8 bits per element and a float32 scale per tensor (per row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import SCALE_BITS, NumberFormat, Rows

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class Float8Format(NumberFormat):
    """FP8 (E4M3 or E5M2) with one float32 scale per tensor or per row."""

    spec: str
    element: str = "e4m3"
    per_row: bool = False
    bits: int = 8
    family: ClassVar[str] = "fp8"

    def __post_init__(self) -> None:
        if self.element not in FP8_DTYPES:
            raise ValueError(f"{self.spec}: the FP8 element must be one of {sorted(FP8_DTYPES)}; got {self.element!r}")

    @property
    def dtype(self) -> torch.dtype:
        return FP8_DTYPES[self.element]

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def rows(self) -> Rows:
        return Rows("row" if self.per_row else "tensor")

    def choose_scales(self, x: torch.Tensor) -> torch.Tensor:
        max_abs = self.rows.view(x.detach()).abs().amax(dim=1, keepdim=True)
        scale = (max_abs / self.max_value).to(torch.float32)
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def quantize_dequantize(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, None]:
        rows = self.rows.view(x).to(torch.float32)
        scaled = torch.clamp(rows / scale, min=-self.max_value, max=self.max_value)
        values = scaled.to(self.dtype).to(torch.float32) * scale
        return values.view(x.shape).to(x.dtype), None

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        numel = 1
        for size in shape:
            numel *= size
        return self.bits * numel + SCALE_BITS * self.rows.count(tuple(shape))

    def levels(self) -> int:
        return 2**8
