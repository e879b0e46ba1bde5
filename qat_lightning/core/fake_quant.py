"""Distiller-style linear fake quantization: EMA-tracked activation ranges, straight-through estimator.

The quantization parameters follow Distiller's formulas (``scale`` in levels per unit,
``q = round(scale * x - zero_point)``, ``x_hat = (q + zero_point) / scale``); the quantize-dequantize
itself runs in torch's fused kernels (``torch.fake_quantize_per_tensor_affine`` /
``..._per_channel_affine``), whose convention is the inverse scale and the negated zero point.
Inputs are first clamped to the tracked range, so the gradient is 1 inside it and 0 outside.
"""
from __future__ import annotations

from enum import Enum

import torch
import torch.distributed as dist
from torch import nn

from ._validate import check_bool, check_choice, check_number


class LinearQuantMode(str, Enum):
    SYMMETRIC = "symmetric"
    SYMMETRIC_RESTRICTED = "symmetric_restricted"
    ASYMMETRIC_UNSIGNED = "asymmetric_unsigned"
    ASYMMETRIC_SIGNED = "asymmetric_signed"


MODES = tuple(m.value for m in LinearQuantMode)


def quantization_range(num_bits: int, mode: str) -> tuple[int, int]:
    """Integer levels ``(q_min, q_max)`` that Distiller's formulas produce for clamped inputs."""
    if mode == LinearQuantMode.SYMMETRIC:
        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1)  # n = (2^b - 1) / 2 rounds out to 2^(b-1)
    if mode == LinearQuantMode.SYMMETRIC_RESTRICTED:
        return -(2 ** (num_bits - 1) - 1), 2 ** (num_bits - 1) - 1
    if mode == LinearQuantMode.ASYMMETRIC_SIGNED:
        return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    return 0, 2**num_bits - 1


def linear_quant_params(
    num_bits: int, mode: str, min_val: torch.Tensor, max_val: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distiller's ``(scale, zero_point)`` for a range, and the clamp range ``(low, high)`` it implies.

    Symmetric: ``scale = n / max(|min|, |max|)`` with ``n = (2^b - 1) / 2`` (``2^(b-1) - 1``
    restricted), zero point 0. Asymmetric: the range is widened to include 0,
    ``scale = (2^b - 1) / (max - min)``, ``zero_point = round(scale * min)`` (``+ 2^(b-1)`` signed).
    A zero-width range gets scale 1, as in Distiller.
    """
    if mode in (LinearQuantMode.SYMMETRIC, LinearQuantMode.SYMMETRIC_RESTRICTED):
        n = (2**num_bits - 1) / 2 if mode == LinearQuantMode.SYMMETRIC else 2 ** (num_bits - 1) - 1
        max_abs = torch.maximum(min_val.abs(), max_val.abs())
        scale = n / torch.where(max_abs > 0, max_abs, torch.full_like(max_abs, n))
        return scale, torch.zeros_like(scale), -max_abs, max_abs
    low, high = torch.clamp(min_val, max=0), torch.clamp(max_val, min=0)
    levels = 2**num_bits - 1
    diff = high - low
    scale = levels / torch.where(diff > 0, diff, torch.full_like(diff, levels))
    zero_point = torch.round(scale * low)
    if mode == LinearQuantMode.ASYMMETRIC_SIGNED:
        zero_point = zero_point + 2 ** (num_bits - 1)
    return scale, zero_point, low, high


def update_ema(biased: torch.Tensor, value: torch.Tensor, decay: float, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``biased = biased * d + (1 - d) * value``; returns it and the bias-corrected ``biased / (1 - d^step)``."""
    biased = biased * decay + (1 - decay) * value
    return biased, biased / (1 - decay**step)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
    num_bits: int, mode: str, axis: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Clamp to ``[low, high]`` (gradient 0 outside), then quantize-dequantize with a straight-through
    gradient, in torch's fused kernel (per tensor, or per channel along ``axis``)."""
    q_min, q_max = quantization_range(num_bits, mode)
    inv_scale = (1 / scale).float()
    zp = (-zero_point).round().to(torch.int32)
    if axis is None:
        x = torch.clamp(x, low, high)
        return torch.fake_quantize_per_tensor_affine(x, inv_scale.reshape(()), zp.reshape(()), q_min, q_max)
    shape = [1] * x.dim()
    shape[axis] = -1
    x = torch.clamp(x, low.reshape(shape), high.reshape(shape))
    return torch.fake_quantize_per_channel_affine(x, inv_scale, zp, axis, q_min, q_max)


class FakeLinearQuantization(nn.Module):
    """Fake-quantizes its input over a range tracked with a bias-corrected EMA of batch min/max.

    Training: each call folds the batch min/max into the EMA (unless ``observe`` is off) and
    recomputes scale and zero point; eval: the frozen values are used. Before the first update
    the input passes through unchanged (there is no range yet). Under ``torch.distributed`` the
    batch min/max are reduced over ranks first, so every rank tracks the same range.

    Example::

        fq = FakeLinearQuantization(num_bits=8, mode="asymmetric_unsigned")
        y = fq(torch.relu(x))       # training: updates the range, returns x fake-quantized

    Args:
        num_bits: bit width, 2..16.
        mode: ``"symmetric"``, ``"symmetric_restricted"``, ``"asymmetric_unsigned"`` or ``"asymmetric_signed"``.
        ema_decay: EMA decay in ``[0, 1)``.
        dequantize: return dequantized values (the only mode that trains; False returns levels).
    """

    def __init__(self, num_bits: int = 8, mode: str = "symmetric", ema_decay: float = 0.999, dequantize: bool = True) -> None:
        super().__init__()
        self.num_bits = check_number("num_bits", num_bits, low=2, high=16, integer=True)
        self.mode = LinearQuantMode(check_choice("mode", mode, MODES))
        self.ema_decay = check_number("ema_decay", ema_decay, low=0, high=1, high_open=True)
        self.dequantize = check_bool("dequantize", dequantize)
        self.enabled = True  # False: pass-through (ranges may still be observed)
        self.observe = True  # False: ranges frozen, also in training
        for name in ("tracked_min_biased", "tracked_min", "tracked_max_biased", "tracked_max", "iter_count", "zero_point"):
            self.register_buffer(name, torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.observe:
            self.update_range(x)
        if not self.enabled or self.iter_count == 0:
            return x
        low, high = self._clamp_range()
        if not self.dequantize:
            return torch.round(self.scale * torch.clamp(x, low, high) - self.zero_point)
        return fake_quantize(x, self.scale, self.zero_point, low, high, self.num_bits, self.mode)

    @torch.no_grad()
    def update_range(self, x: torch.Tensor) -> None:
        current_min, current_max = torch.aminmax(x.detach().float())
        if dist.is_available() and dist.is_initialized():
            both = torch.stack([-current_min, current_max])
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            current_min, current_max = -both[0], both[1]
        self.iter_count += 1
        biased_min, tracked_min = update_ema(self.tracked_min_biased, current_min, self.ema_decay, self.iter_count)
        biased_max, tracked_max = update_ema(self.tracked_max_biased, current_max, self.ema_decay, self.iter_count)
        for name, value in (("tracked_min_biased", biased_min), ("tracked_min", tracked_min),
                            ("tracked_max_biased", biased_max), ("tracked_max", tracked_max)):  # fmt: skip
            getattr(self, name).copy_(value)
        scale, zero_point, _, _ = linear_quant_params(self.num_bits, self.mode, self.tracked_min, self.tracked_max)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def _clamp_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, low, high = linear_quant_params(self.num_bits, self.mode, self.tracked_min, self.tracked_max)
        return low, high

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, mode={self.mode.value}, ema_decay={self.ema_decay}"


def weight_fake_quantize(w: torch.Tensor, num_bits: int, mode: str, axis: int | None) -> torch.Tensor:
    """Fake-quantize a weight over its current range, per channel along ``axis`` or per tensor."""
    with torch.no_grad():
        if axis is None:
            mn, mx = torch.aminmax(w)
        else:
            flat = w.detach().transpose(0, axis).reshape(w.shape[axis], -1)
            mn, mx = torch.aminmax(flat, dim=1)
        scale, zero_point, low, high = linear_quant_params(num_bits, mode, mn.float(), mx.float())
    return fake_quantize(w, scale, zero_point, low, high, num_bits, mode, axis)
