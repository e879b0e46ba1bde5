"""The element types of the block formats: FP8 (E4M3, E5M2), FP6 (E2M3, E3M2) and FP4 (E2M1),
and rounding to them (to nearest, ties to even, saturating at the largest finite value).

FP8 elements use torch's own casts. FP6 and FP4 have no torch dtype to cast to one element at a
time; :func:`round_to_element` computes the same rounding: the exponent of ``|x|`` (at least the
smallest normal one) gives the spacing ``2^(e - m)`` of the grid around ``x``, ``|x| / spacing``
is exact (a power of two), and rounding it half to even is the format's round to nearest even.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Element:
    """A small float type: exponent and mantissa bits, exponent bias, largest finite value."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max_value: float
    dtype: torch.dtype | None = None  # a torch dtype that casts to it, if any

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def max_pow2(self) -> int:
        """The exponent of the largest power of two the element holds (``floor(log2(max))``)."""
        exponent = 0
        while 2.0 ** (exponent + 1) <= self.max_value:
            exponent += 1
        return exponent

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    def levels(self) -> int:
        """Distinct finite values (``+0`` and ``-0`` counted once)."""
        return 2 * len(self.magnitudes()) - 1

    def magnitudes(self) -> torch.Tensor:
        """Every non-negative finite value, in increasing order (for tests and documentation)."""
        spacing_exponents = range(self.min_normal_exponent, self.min_normal_exponent + 2**self.exponent_bits + 2)
        values = {0.0}
        for exponent in spacing_exponents:
            for mantissa in range(2**self.mantissa_bits):
                for base in (0.0, 1.0):  # subnormal (only at the smallest exponent) and normal
                    if base == 0.0 and exponent != self.min_normal_exponent:
                        continue
                    value = (base + mantissa / 2**self.mantissa_bits) * 2.0**exponent
                    if value <= self.max_value:
                        values.add(value)
        return torch.tensor(sorted(values), dtype=torch.float32)


ELEMENTS = {
    "e4m3": Element("e4m3", 4, 3, 7, float(torch.finfo(torch.float8_e4m3fn).max), torch.float8_e4m3fn),
    "e5m2": Element("e5m2", 5, 2, 15, float(torch.finfo(torch.float8_e5m2).max), torch.float8_e5m2),
    "e2m3": Element("e2m3", 2, 3, 1, 7.5),
    "e3m2": Element("e3m2", 3, 2, 3, 28.0),
    "e2m1": Element("e2m1", 2, 1, 1, 6.0),
}


def round_to_element(x: torch.Tensor, element: Element) -> torch.Tensor:
    """Float32 ``x`` rounded to ``element`` (nearest, ties to even, saturating), as float32."""
    if element.dtype is not None:
        clamped = torch.clamp(x, -element.max_value, element.max_value)
        return clamped.to(element.dtype).to(torch.float32)
    magnitude = x.abs()
    _, exponent = torch.frexp(magnitude)  # magnitude = m * 2^exponent, m in [0.5, 1)
    exponent = torch.clamp(exponent - 1, min=element.min_normal_exponent)
    spacing = torch.exp2((exponent - element.mantissa_bits).to(torch.float32))
    rounded = torch.round(magnitude / spacing) * spacing
    return torch.copysign(torch.clamp(rounded, max=element.max_value), x)
