"""DiffQ's parameterisation of the learned bits: a logit per group mapped to a number of bits
(``param="bits"``: a sigmoid between ``min_bits`` and ``max_bits``; ``"noise"``: a sigmoid in the
log of the noise scale), and the closed-form derivatives the noise op and the size penalty need."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BitsParameterization:
    """``bits(logit)`` for ``min_bits < bits < max_bits``, in the reference's two forms."""

    min_bits: float
    max_bits: float
    param: str = "bits"

    @property
    def min_noise(self) -> float:
        return 1 / (2**self.max_bits - 1)

    @property
    def max_noise(self) -> float:
        return 1 / (2**self.min_bits - 1)

    def init_logit(self, init_bits: float) -> float:
        """The logit whose bits are ``init_bits``."""
        if self.param == "noise":
            t = (math.log(1 / (2**init_bits - 1)) - math.log(self.max_noise)) / (math.log(self.min_noise) - math.log(self.max_noise))
        else:
            t = (init_bits - self.min_bits) / (self.max_bits - self.min_bits)
        return math.log(t / (1 - t))

    def logit_of(self, bits: torch.Tensor) -> torch.Tensor:
        """The logits whose bits are ``bits`` (strictly between ``min_bits`` and ``max_bits``): the
        inverse of :meth:`bits`, elementwise (:meth:`init_logit` for a tensor)."""
        if self.param == "noise":
            log_unit = -torch.log(torch.exp2(bits) - 1)
            t = (log_unit - math.log(self.max_noise)) / (math.log(self.min_noise) - math.log(self.max_noise))
        else:
            t = (bits - self.min_bits) / (self.max_bits - self.min_bits)
        return torch.log(t) - torch.log1p(-t)

    def bits(self, logit: torch.Tensor) -> torch.Tensor:
        """Bits per group (before ``extra_bits`` and rounding)."""
        if self.param == "noise":
            return torch.log2(1 + 1 / self.noise_unit(logit))
        t = torch.sigmoid(logit)
        return self.max_bits * t + (1 - t) * self.min_bits

    def derivative(self, logit: torch.Tensor) -> torch.Tensor:
        """``d bits / d logit`` in closed form (the size penalty's gradient)."""
        t = torch.sigmoid(logit)
        slope = t * (1 - t)
        if self.param == "bits":
            return (self.max_bits - self.min_bits) * slope
        # bits = log2(1 + 1/noise), log(noise) = t log(min_noise) + (1 - t) log(max_noise)
        log_ratio = math.log(self.min_noise) - math.log(self.max_noise)
        return -log_ratio * slope / ((1 + self.noise_unit(logit)) * math.log(2))

    def noise_unit(self, logit: torch.Tensor) -> torch.Tensor:
        """The quantization step relative to the tensor's range, ``1 / (2**bits - 1)``."""
        if self.param == "noise":
            t = torch.sigmoid(logit)
            return torch.exp(t * math.log(self.min_noise) + (1 - t) * math.log(self.max_noise))
        return 1 / (torch.exp2(self.bits(logit)) - 1)  # exp2: 10x faster than 2 ** tensor on CPU

    def step_constants(self, logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(unit, d log(unit) / d logit, d bits / d logit)`` for a training step, in place where
        possible: the logits are an eighth of the weights, and each temporary costs page faults."""
        t = torch.sigmoid(logit)
        slope = torch.addcmul(t, t, t, value=-1)  # d t / d logit = t (1 - t)
        if self.param == "noise":  # log unit = t log(min_noise) + (1 - t) log(max_noise)
            log_ratio = math.log(self.min_noise) - math.log(self.max_noise)
            unit = t.mul_(log_ratio).add_(math.log(self.max_noise)).exp_()
            log_slope = slope * log_ratio
            bits_slope = slope.mul_(-log_ratio / math.log(2)).div_(unit + 1)  # bits = log2(1 + 1 / unit)
        else:  # unit = 1 / (2**bits - 1), d log unit / d bits = -ln 2 (1 + unit)
            span = self.max_bits - self.min_bits
            unit = t.mul_(span).add_(self.min_bits).exp2_().sub_(1).reciprocal_()
            log_slope = torch.add(unit, 1).mul_(slope).mul_(-math.log(2) * span)
            bits_slope = slope.mul_(span)
        return unit, log_slope, bits_slope
