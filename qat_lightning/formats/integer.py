"""Integer formats as torchao's QAT computes them (``IntxFakeQuantizeConfig``, ``choose_qparams_affine``).

Spec ``int{B}[_asym][_per_channel | _per_token | _per_row | _g{N}]``, ``B`` in 2..8, signed levels
``[-2^(B-1), 2^(B-1) - 1]``:

* granularity: per tensor (default); ``_per_channel`` one scale per slice of dim 0 (a weight's
  output channel, the rest flattened); ``_per_row`` / ``_per_token`` one per vector of the last
  dimension; ``_g{N}`` one per group of ``N`` consecutive elements of the last dimension (which
  ``N`` must divide).
* symmetric (default): ``scale = max(|min|, |max|) / ((q_max - q_min) / 2)`` (``2^(B-1) - 1/2``:
  the largest value rounds to ``2^(B-1)`` and clips to ``q_max``, as in torchao), zero point 0.
  ``_asym``: ``scale = (max(max, 0) - min(min, 0)) / (q_max - q_min)``, ``zero_point = q_min -
  round(min / scale)`` (clamped to the levels); ``int8_per_token`` is asymmetric (torchao's
  dynamic per-token activations).
* ``scale`` is computed in the tensor's dtype, clamped to its smallest normal number and kept in
  float32; ``q = clamp(round(x * (1 / scale)) + zero_point, q_min, q_max)``, ``x_hat = (q -
  zero_point) * scale`` rounded once into the tensor's dtype. Rounding: half to even.
* gradient: 1 where ``round(x / scale) + zero_point`` lies within the levels, 0 where it was
  clipped (the maximum of a symmetric block is: its level ``2^(B-1)`` is clipped).
* storage: ``B`` bits per element, a float32 scale per block (and a ``B``-bit zero point per block
  when asymmetric).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import SCALE_BITS, NumberFormat, Rows

GRANULARITIES = ("tensor", "channel", "row", "group")


@dataclass(frozen=True)
class IntFormat(NumberFormat):
    """Signed ``bits``-bit integers with one scale (and zero point) per tensor / channel / row / group."""

    spec: str
    bits: int
    granularity: str = "tensor"
    group_size: int = 0
    symmetric: bool = True
    family: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"{self.spec}: integer formats have 2 to 8 bits; got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"{self.spec}: granularity must be one of {GRANULARITIES}; got {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size > 0):
            raise ValueError(f"{self.spec}: a group size goes with granularity 'group' only")
        if self.group_size and self.group_size < 2:
            raise ValueError(f"{self.spec}: the group size must be at least 2; got {self.group_size}")

    @property
    def q_min(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def q_max(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def rows(self) -> Rows:
        if self.granularity == "group":
            return Rows("block", self.group_size)
        return Rows(self.granularity)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        self.rows.check(self.spec, shape)

    def choose_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = torch.aminmax(self.rows.view(x.detach()), dim=1, keepdim=True)  # one pass for both
        low_neg, high_pos = torch.clamp(low, max=0), torch.clamp(high, min=0)
        eps = torch.finfo(x.dtype).smallest_normal
        if self.symmetric:
            scale = torch.max(-low_neg, high_pos) / (float(self.q_max - self.q_min) / 2)
            return torch.clamp(scale, min=eps).to(torch.float32), torch.zeros_like(scale, dtype=torch.int32)
        scale = torch.clamp((high_pos - low_neg) / float(self.q_max - self.q_min), min=eps)
        zero_point = torch.clamp(self.q_min - torch.round(low_neg / scale), self.q_min, self.q_max)
        return scale.to(torch.float32), zero_point.to(torch.int32)

    def quantize_dequantize(self, x: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero_point = scales
        levels = torch.mul(self.rows.view(x), 1.0 / scale).round_()
        if not self.symmetric:
            levels.add_(zero_point)
        clamped = torch.clamp(levels, self.q_min, self.q_max)
        mask = clamped == levels  # inside the levels: the gradient passes
        values = clamped.to(x.dtype)
        if not self.symmetric:
            values = values - zero_point.to(x.dtype)
        return (values * scale).to(x.dtype).view_as(x), mask.view_as(x)

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        numel = 1
        for size in shape:
            numel *= size
        blocks = self.rows.count(tuple(shape))
        return self.bits * numel + blocks * (SCALE_BITS + (0 if self.symmetric else self.bits))

    def levels(self) -> int:
        return 2**self.bits
