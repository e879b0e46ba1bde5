"""NVFP4 as torchao computes it (``NVFP4Tensor.to_nvfp4`` with a per-tensor scale, the QAT default).

Spec ``nvfp4``:

* E2M1 elements in blocks of 16 consecutive elements of the last dimension (which 16 must
  divide), one E4M3 scale per block, and one float32 scale per tensor: ``tensor_scale = max|x| /
  (448 * 6)``; each block's ``max|block| / 6 / tensor_scale`` is rounded to E4M3 (clamped to
  ``[2^-6, 448]``) as ``s``; elements ``clamp(x * ((1 / tensor_scale) / s), +-6)`` rounded to E2M1
  (nearest, ties to even); ``x_hat = element * (tensor_scale * s)`` in float32, rounded once into
  the tensor's dtype.
* a tensor of zeros stays zero (torchao divides by a zero tensor scale there).
* gradient: 1 everywhere (the scales keep every element within +-6).
* storage: 4 bits per element, 8 bits per block of 16, 32 bits per tensor (4.5 bits per element).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import SCALE_BITS, NumberFormat, Rows
from .minifloat import ELEMENTS, round_to_element

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
E4M3_TINY = float(torch.finfo(torch.float8_e4m3fn).tiny)
E2M1_MAX = 6.0
NVFP4_BLOCK = 16


@dataclass(frozen=True)
class NVFP4Format(NumberFormat):
    """NVIDIA's FP4: E2M1 elements, E4M3 scales per block of 16, a float32 scale per tensor."""

    spec: str = "nvfp4"
    bits: int = 4
    block_size: int = NVFP4_BLOCK
    family: ClassVar[str] = "nvfp4"

    @property
    def rows(self) -> Rows:
        return Rows("block", self.block_size)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        self.rows.check(self.spec, shape)

    def choose_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tensor scale, E4M3 block scales as float32)``."""
        tensor_scale = x.detach().abs().max().to(torch.float32) / (E4M3_MAX * E2M1_MAX)
        tensor_scale = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))
        block_max = self.rows.view(x.detach()).to(torch.float32).abs().amax(dim=1, keepdim=True)
        block_scale = torch.clamp(block_max / E2M1_MAX / tensor_scale, min=E4M3_TINY, max=E4M3_MAX)
        return tensor_scale, block_scale.to(torch.float8_e4m3fn).to(torch.float32)

    def quantize_dequantize(self, x: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, None]:
        tensor_scale, block_scale = scales
        rows = self.rows.view(x).to(torch.float32)
        scaled = torch.clamp(rows * ((1.0 / tensor_scale) / block_scale), -E2M1_MAX, E2M1_MAX)
        elements = round_to_element(scaled, ELEMENTS["e2m1"])
        values = elements * (tensor_scale * block_scale)
        return values.view(x.shape).to(x.dtype), None

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        numel = 1
        for size in shape:
            numel *= size
        return self.bits * numel + 8 * self.rows.count(tuple(shape)) + SCALE_BITS

    def levels(self) -> int:
        return ELEMENTS["e2m1"].levels()
