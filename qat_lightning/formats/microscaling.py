"""OCP Microscaling (MX) formats as torchao computes them (``MXTensor.to_mx``, ``MXFakeQuantizeConfig``).

Spec ``mxfp8`` (E4M3 elements), ``mxfp8_e5m2``, ``mxfp6_e2m3``, ``mxfp6_e3m2``, ``mxfp4`` (E2M1),
optionally ``_floor``:

* blocks of 32 consecutive elements of the last dimension (which 32 must divide) share one E8M0
  scale, a power of two ``2^e``, ``e`` in ``[-127, 127]``; elements are stored in the element type.
* scale (default, ``rceil``: torchao's QAT and inference default, NVIDIA's rule): ``e = ceil(log2(
  max|block| / element_max))``, elements ``clamp(x * 2^-e, +-element_max)`` rounded to the element
  (nearest, ties to even); nothing saturates. ``_floor`` (the OCP spec's rule): ``e =
  floor(log2(max|block|)) - floor(log2(element_max))``, elements ``x / 2^e`` rounded and saturated
  at ``element_max`` (the largest values of a block may clip).
* ``x_hat = element * 2^e`` in float32, rounded once into the tensor's dtype.
* gradient: 1 where ``|x| / 2^e <= element_max``, 0 where an element saturated (``_floor`` only).
* storage: element bits per element and 8 bits per block of 32 (``mxfp4``: 4.25 bits per element).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import NumberFormat, Rows
from .minifloat import ELEMENTS, Element, round_to_element

E8M0_BIAS = 127
E8M0_NAN = 255
F32_MIN_NORMAL = 2.0**-126
MX_BLOCK = 32
MX_SPECS = {"mxfp8": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp6_e2m3": "e2m3", "mxfp6_e3m2": "e3m2", "mxfp4": "e2m1"}


@dataclass(frozen=True)
class MXFormat(NumberFormat):
    """OCP MX: ``element`` values in blocks of 32 with one E8M0 (power of two) scale each."""

    spec: str
    element_name: str = "e2m1"
    scaling: str = "rceil"
    block_size: int = MX_BLOCK
    family: ClassVar[str] = "mx"

    def __post_init__(self) -> None:
        if self.element_name not in ELEMENTS:
            raise ValueError(f"{self.spec}: the MX element must be one of {sorted(ELEMENTS)}; got {self.element_name!r}")
        if self.scaling not in ("rceil", "floor"):
            raise ValueError(f"{self.spec}: the MX scaling rule must be 'rceil' or 'floor'; got {self.scaling!r}")

    @property
    def element(self) -> Element:
        return ELEMENTS[self.element_name]

    @property
    def bits(self) -> int:  # type: ignore[override]
        return self.element.bits

    @property
    def rows(self) -> Rows:
        return Rows("block", self.block_size)

    def check_shape(self, shape: tuple[int, ...]) -> None:
        self.rows.check(self.spec, shape)

    def choose_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E8M0 exponent as uint8, float32 pre-scale)``: elements are ``x * pre`` (``rceil``) or
        ``x / pre`` (``floor``) before rounding, as torchao computes them."""
        max_abs = self.rows.view(x.detach()).abs().amax(dim=1, keepdim=True).to(torch.float32)
        element = self.element
        if self.scaling == "rceil":
            descale = max_abs / element.max_value
            unbiased = torch.clamp(torch.ceil(torch.log2(descale)), min=-E8M0_BIAS, max=E8M0_BIAS)
            exponent = torch.where(torch.isinf(descale), 254, (unbiased + E8M0_BIAS).to(torch.uint8))
            exponent = torch.where(torch.isnan(descale), E8M0_NAN, exponent).to(torch.uint8)
            factor = torch.where(exponent == 0, 1.0, torch.exp2(E8M0_BIAS - exponent.to(torch.float32)))
            factor = torch.where(exponent == 254, 2.0**-127, factor)
            return exponent, torch.where(exponent == E8M0_NAN, descale, factor)
        biased_pow2 = torch.bitwise_right_shift(max_abs.view(torch.int32), 23) & 0xFF
        unbiased = torch.clamp(biased_pow2 - E8M0_BIAS - element.max_pow2, min=-E8M0_BIAS, max=E8M0_BIAS + 1)
        exponent = torch.where(torch.isnan(max_abs), E8M0_NAN, (unbiased + E8M0_BIAS).to(torch.uint8)).to(torch.uint8)
        scale = torch.bitwise_left_shift(exponent.to(torch.int32), 23).view(torch.float32)
        return exponent, torch.clamp(scale, min=F32_MIN_NORMAL)

    def quantize_dequantize(self, x: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        exponent, pre = scales
        rows = self.rows.view(x).to(torch.float32)
        if self.scaling == "rceil":
            scaled = torch.clamp(rows * pre, min=-self.element.max_value, max=self.element.max_value)
            mask = None
        else:
            scaled = rows / pre
            mask = scaled.abs() <= self.element.max_value
        elements = round_to_element(scaled, self.element)
        block_scale = torch.pow(torch.full_like(exponent, 2.0, dtype=torch.float32), exponent.to(torch.int16) - E8M0_BIAS)
        block_scale = torch.where(exponent != E8M0_NAN, block_scale, float("nan"))
        values = (elements * block_scale).view(x.shape).to(x.dtype)
        return values, None if mask is None else mask.view(x.shape)

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        numel = 1
        for size in shape:
            numel *= size
        return self.element.bits * numel + 8 * self.rows.count(tuple(shape))

    def levels(self) -> int:
        return self.element.levels()
