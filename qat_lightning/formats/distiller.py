"""Distiller's linear quantization grids and their fake-quant ops (straight-through estimator).

The quantization parameters follow Distiller's formulas (``scale`` in levels per unit,
``q = round(scale * x - zero_point)``, ``x_hat = (q + zero_point) / scale``) in four modes:
``symmetric`` (``n = (2^b - 1) / 2``: 2^b + 1 levels), ``symmetric_restricted`` (``[-(2^(b-1) - 1),
2^(b-1) - 1]``), ``asymmetric_unsigned`` and ``asymmetric_signed``. On CUDA the quantize-dequantize
runs in torch's fused kernels (``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``,
whose convention is the inverse scale and the negated zero point); on the CPU the same math in
vectorised ops. Inputs are first clamped to the range, so the gradient is 1 inside it and 0 outside.
The host helpers compute one range's parameters in float32, op for op as the tensor code.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from .base import NumberFormat

class LinearQuantMode(str, Enum):
    SYMMETRIC = "symmetric"
    SYMMETRIC_RESTRICTED = "symmetric_restricted"
    ASYMMETRIC_UNSIGNED = "asymmetric_unsigned"
    ASYMMETRIC_SIGNED = "asymmetric_signed"


MODES = tuple(m.value for m in LinearQuantMode)
_SYMMETRIC = (LinearQuantMode.SYMMETRIC, LinearQuantMode.SYMMETRIC_RESTRICTED)
_TINY = 1e-30  # keeps the division finite where the range is empty; torch.where then picks scale 1


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


_FLOAT32 = struct.Struct("<f")
_UINT32 = struct.Struct("<I")
_TINY32 = _FLOAT32.unpack(_FLOAT32.pack(_TINY))[0]


def f32(v: float) -> float:
    """Round a Python float to the nearest float32 (a correctly rounded float32 op is the double op
    rounded this way: double has more than twice float32's precision)."""
    return _FLOAT32.unpack(_FLOAT32.pack(v))[0]


def host_quant_params(num_bits: int, mode: str, tracked_min: float, tracked_max: float) -> tuple[float, float, float, float]:
    """:func:`linear_quant_params` for one range in host float32 arithmetic, op for op as the
    module's tensor code computes it (so both give identical bits): ``(scale, zero_point, low, high)``.

    Plain Python floats rounded to float32 after every op: a few hundred nanoseconds, where the
    same ops on 0-dim tensors cost microseconds each."""
    if mode in (LinearQuantMode.SYMMETRIC, LinearQuantMode.SYMMETRIC_RESTRICTED):
        levels = (2**num_bits - 1) / 2 if mode == LinearQuantMode.SYMMETRIC else 2 ** (num_bits - 1) - 1.0
        width = max(abs(tracked_min), abs(tracked_max))
        low, high, zero_point = -width, width, 0.0
    else:
        levels = 2.0**num_bits - 1
        low, high = min(tracked_min, 0.0), max(tracked_max, 0.0)
        width = f32(high - low)
        zero_point = float(round(f32(f32(levels / max(width, _TINY32)) * low)))  # round half to even, as torch
        if mode == LinearQuantMode.ASYMMETRIC_SIGNED:
            zero_point += 2 ** (num_bits - 1)
    scale = f32(levels / max(width, _TINY32)) if width > 0 else 1.0
    return scale, zero_point, low, high


def _next_float32(v: float, up: bool) -> float:
    """The float32 neighbour of float32 ``v`` towards +inf (``up``) or -inf."""
    if v == 0:
        return 2.0**-149 if up else -(2.0**-149)
    bits = _UINT32.unpack(_FLOAT32.pack(v))[0]
    bits += 1 if (v > 0) == up else -1
    return _FLOAT32.unpack(_UINT32.pack(bits))[0]


def _next_down(v: float) -> float:
    return _next_float32(f32(v), up=False)


def _next_up(v: float) -> float:
    return _next_float32(f32(v), up=True)


def per_tensor_plan(scale: float, zero_point: float, low: float, high: float) -> tuple[float, ...]:
    """What :class:`_PerTensorSTE` needs for one range, computed once per range update:
    ``(scale, zero_point, level_low, level_high, grad_low, grad_high)``."""
    level_low = f32(f32(low * scale) - zero_point)
    level_high = f32(f32(high * scale) - zero_point)
    return scale, zero_point, level_low, level_high, _next_down(low), _next_up(high)


class _PerTensorSTE(torch.autograd.Function):
    """Clamp to ``[low, high]`` and quantize-dequantize per tensor on the CPU, in vectorised ops.

    ``x * scale - zp`` is monotone, so clamping the levels to the images of ``low`` and ``high`` is
    bit-identical to Distiller's clamp of ``x``; the backward is one ``hardtanh_backward`` over the
    closed range (bounds moved out by one float32 ulp), i.e. the straight-through gradient of the clamp.
    """

    @staticmethod
    def forward(ctx, x, plan):  # type: ignore[override]  # noqa: ANN001, ANN205
        scale, zero_point, level_low, level_high, grad_low, grad_high = plan
        y = torch.mul(x, scale)
        if zero_point:
            y.sub_(zero_point)
        y.clamp_(level_low, level_high).round_()
        if zero_point:
            y.add_(zero_point)
        y.div_(scale)
        ctx.save_for_backward(x)
        ctx.bounds = (grad_low, grad_high)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, *ctx.bounds), None


class _RoundSTE(torch.autograd.Function):
    """Distiller's quantize-dequantize ``(round(scale * x - zp) + zp) / scale``; identity gradient.

    Callers clamp first (autograd's ``clamp`` backward is the range mask)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, symmetric):  # type: ignore[override]  # noqa: ANN001, ANN205
        if symmetric:  # zero point 0: two passes fewer
            return (x * scale).round_().div_(scale)
        return (x * scale).sub_(zero_point).round_().add_(zero_point).div_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # noqa: ANN001, ANN205
        return grad.contiguous(), None, None, None  # Linear's weight gradient arrives transposed: copy once here


def _broadcast_shape(x: torch.Tensor, axis: int | None) -> list[int]:
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    return shape


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
    num_bits: int, mode: str, axis: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Clamp to ``[low, high]`` (gradient 0 outside), then quantize-dequantize with a straight-through
    gradient, per tensor or per channel along ``axis``.

    On CUDA this runs torch's fused kernels (``fake_quantize_per_{tensor,channel}_affine``); on the
    CPU those kernels are scalar loops, several times slower than the same math in vectorised ops,
    so Distiller's formula is computed directly (tests check both agree).
    """
    if x.is_cuda:
        return fused_fake_quantize(x, scale, zero_point, low, high, num_bits, mode, axis)
    if axis is None and not torch.compiler.is_compiling():  # host scalars do not trace: the tensor formula below
        return _PerTensorSTE.apply(x, per_tensor_plan(scale.item(), zero_point.item(), low.item(), high.item()))
    shape = _broadcast_shape(x, axis)
    scale, zero_point, low, high = (t.reshape(shape) for t in (scale, zero_point, low, high))
    symmetric = mode in (LinearQuantMode.SYMMETRIC, LinearQuantMode.SYMMETRIC_RESTRICTED)
    return _RoundSTE.apply(torch.clamp(x, low, high), scale.to(x.dtype), zero_point.to(x.dtype), symmetric)


def fused_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
    num_bits: int, mode: str, axis: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """The same as :func:`fake_quantize` through torch's fused kernels (inverse scale, negated zero point)."""
    q_min, q_max = quantization_range(num_bits, mode)
    if axis is not None:
        shape = _broadcast_shape(x, axis)
        low, high = low.reshape(shape), high.reshape(shape)
    x = torch.clamp(x, low, high)
    inv_scale = (1 / scale).float().reshape(-1)
    zp = (-zero_point).round().to(torch.int32).reshape(-1)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, inv_scale.reshape(()), zp.reshape(()), q_min, q_max)
    return torch.fake_quantize_per_channel_affine(x, inv_scale, zp, axis, q_min, q_max)


# ------------------------------------------------------------------------------------------- LSQ
def channel_min_max(w: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of a (detached) weight, per channel along ``axis`` or over the whole tensor."""
    w = w.detach()
    if axis is None:
        return torch.aminmax(w)
    flat = w.transpose(0, axis).reshape(w.shape[axis], -1)
    return torch.amin(flat, 1), torch.amax(flat, 1)  # 16x faster than aminmax(dim=1) on CPU


def weight_fake_quantize(w: torch.Tensor, num_bits: int, mode: str, axis: int | None) -> torch.Tensor:
    """Fake-quantize a weight over its current range, per channel along ``axis`` or per tensor.

    The range is the weight's own min/max, so nothing is clamped and the gradient is the identity.
    """
    symmetric = mode in _SYMMETRIC
    mn, mx = channel_min_max(w, axis)  # detached: nothing below records a graph
    if symmetric and not w.is_cuda:
        # Distiller's ``n / max_abs`` (torch computes a scalar over a tensor as reciprocal times
        # the scalar); an all-zero channel gets a huge scale instead of 1, which quantizes it to
        # zeros all the same
        n = (2**num_bits - 1) / 2 if mode == LinearQuantMode.SYMMETRIC else 2 ** (num_bits - 1) - 1
        scale = torch.maximum(mn.float().neg_(), mx.float()).clamp_(min=_TINY).reciprocal_().mul_(n)
        if axis is not None:
            scale = scale.view(_broadcast_shape(w, axis))
        return _RoundSTE.apply(w, scale.to(w.dtype), None, True)
    scale, zero_point, low, high = linear_quant_params(num_bits, mode, mn.float(), mx.float())
    if w.is_cuda:
        return fused_fake_quantize(w, scale, zero_point, low, high, num_bits, mode, axis)
    shape = _broadcast_shape(w, axis)
    zero_point = None if symmetric else zero_point.reshape(shape).to(w.dtype)
    return _RoundSTE.apply(w, scale.reshape(shape).to(w.dtype), zero_point, symmetric)


def bias_fake_quantize(b: torch.Tensor, num_bits: int = 32) -> torch.Tensor:
    """Symmetric per-tensor fake quantization of a bias to ``num_bits`` (32: an int32 accumulator),
    computed in float64 so that the 32-bit grid is represented exactly; identity gradient."""
    return _BiasSTE.apply(b, num_bits)


class _BiasSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b, num_bits):  # type: ignore[override]  # noqa: ANN001, ANN205
        b64 = b.detach().double()
        n = 2 ** (num_bits - 1) - 1
        max_abs = b64.abs().max() if b64.numel() else b64.new_zeros(())
        scale = torch.where(max_abs > 0, n / max_abs.clamp(min=_TINY), torch.ones_like(max_abs))
        return (b64 * scale).round_().div_(scale).to(b.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # noqa: ANN001, ANN205
        return grad, None



# ------------------------------------------------------------------------------------------- as a format
@dataclass(frozen=True)
class DistillerFormat(NumberFormat):
    """Distiller's grid as a registered format: spec ``distiller{B}_{mode}[_per_channel][_ema|_lsq]``.

    Without a range method the range is the tensor's current min / max (per tensor, or per slice of
    dim 0 with ``_per_channel``): the weight quantizer of :class:`~qat_lightning.EMAFakeQuant`.
    ``_ema`` tracks an activation's range with a bias-corrected EMA of batch min / max (Distiller's
    ``QuantAwareTrainRangeLinearQuantizer``), ``_lsq`` learns the step size (LSQ); those two keep
    state and are built as modules by the quantizers (``fake_quantize`` here uses the current range).
    Gradient: 1 inside the range, 0 outside (the current range clips nothing). Levels: ``2^B + 1``
    (``symmetric``: ``n = (2^B - 1) / 2`` rounds out), ``2^B - 1`` (restricted), ``2^B`` (asymmetric).
    Storage: ``B`` bits per element, a float32 scale per tensor (channel), a ``B``-bit zero point in
    the asymmetric modes."""

    spec: str
    bits: int
    mode: str = "symmetric"
    per_channel: bool = False
    range_method: str = "current"  # "current", "ema" or "lsq"
    family: ClassVar[str] = "distiller"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"{self.spec}: Distiller's grids have 2 to 16 bits; got {self.bits}")
        if self.mode not in MODES:
            raise ValueError(f"{self.spec}: the mode must be one of {MODES}; got {self.mode!r}")
        if self.range_method not in ("current", "ema", "lsq"):
            raise ValueError(f"{self.spec}: the range method must be 'current', 'ema' or 'lsq'; got {self.range_method!r}")
        if self.per_channel and self.range_method == "ema":
            raise ValueError(f"{self.spec}: EMA-tracked ranges are per tensor (activations); drop '_per_channel'")

    @property
    def dynamic(self) -> bool:  # type: ignore[override]
        return self.range_method == "current"

    def choose_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mn, mx = channel_min_max(x, 0 if self.per_channel and x.dim() else None)
        return linear_quant_params(self.bits, self.mode, mn.float(), mx.float())

    def quantize_dequantize(self, x: torch.Tensor, scales: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        axis = 0 if self.per_channel and x.dim() else None
        scale, zero_point, low, high = scales
        shape = _broadcast_shape(x, axis)
        low, high = low.reshape(shape), high.reshape(shape)
        wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # float32 math, rounded once
        if torch.compiler.is_compiling():  # the CPU kernel's host scalars do not trace: the same formula in tensor ops
            scale, zero_point = scale.reshape(shape).to(wide.dtype), zero_point.reshape(shape).to(wide.dtype)
            values = ((torch.clamp(wide, low, high) * scale - zero_point).round() + zero_point) / scale
        else:
            values = fake_quantize(wide, scale, zero_point, low, high, self.bits, self.mode, axis)
        return values.to(x.dtype), (wide >= low) & (wide <= high)

    def storage_bits(self, shape: tuple[int, ...]) -> int:
        numel = 1
        for size in shape:
            numel *= size
        channels = shape[0] if self.per_channel and shape else 1
        return self.bits * numel + channels * (32 + (self.bits if self.mode.startswith("asymmetric") else 0))

    def levels(self) -> int:
        if self.mode == LinearQuantMode.SYMMETRIC:
            return 2**self.bits + 1
        if self.mode == LinearQuantMode.SYMMETRIC_RESTRICTED:
            return 2**self.bits - 1
        return 2**self.bits
