"""Distiller-style linear fake quantization: EMA-tracked activation ranges, straight-through estimator.

The quantization parameters follow Distiller's formulas (``scale`` in levels per unit,
``q = round(scale * x - zero_point)``, ``x_hat = (q + zero_point) / scale``); the quantize-dequantize
itself runs in torch's fused kernels (``torch.fake_quantize_per_tensor_affine`` /
``..._per_channel_affine``), whose convention is the inverse scale and the negated zero point.
Inputs are first clamped to the tracked range, so the gradient is 1 inside it and 0 outside.
"""
from __future__ import annotations

import math
import struct
from enum import Enum
from typing import Any

import numpy as np
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
HALF_DTYPES = (torch.float16, torch.bfloat16)
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


def lsq_range(num_bits: int, mode: str) -> tuple[int, int]:
    """Integer levels of the learned-step mode: a true ``num_bits`` grid for each mode."""
    if mode == LinearQuantMode.SYMMETRIC_RESTRICTED:
        return -(2 ** (num_bits - 1) - 1), 2 ** (num_bits - 1) - 1
    if mode == LinearQuantMode.ASYMMETRIC_UNSIGNED:
        return 0, 2**num_bits - 1
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


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
    if axis is None:
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
class _LearnedStepSTE(torch.autograd.Function):
    """LSQ quantize-dequantize ``(clamp(round(x / s + z), q_min, q_max) - z) * s`` on the CPU.

    Gradients: ``x`` straight through inside the grid, 0 outside; the step size ``s`` gets LSQ's
    ``(q - z) - x / s`` inside and ``q_min - z`` / ``q_max - z`` outside, summed per step entry and
    multiplied by ``grad_factor``; ``z`` is a constant. Same math as torch's
    ``_fake_quantize_learnable_per_{tensor,channel}_affine`` (whose CPU kernels are scalar loops).
    """

    @staticmethod
    def forward(ctx, x, step, zero, q_min, q_max, grad_factor, axis):  # type: ignore[override]  # noqa: ANN001, ANN205
        if axis is None:  # per tensor: host scalars, the fastest CPU kernels
            s, z = step.item(), zero.item()
            inv = f32(1.0 / s)
        else:
            shape = _broadcast_shape(x, axis)
            s, z = step.detach().reshape(shape).to(x.dtype), zero.reshape(shape).to(x.dtype)
            inv = 1 / s
        y = torch.mul(x, inv).add_(z).round_().clamp_(q_min, q_max).sub_(z).mul_(s)
        ctx.save_for_backward(x)
        ctx.constants = (s, z, inv, q_min, q_max, grad_factor, axis, step.shape)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        s, z, inv, q_min, q_max, grad_factor, axis, step_shape = ctx.constants
        levels = torch.mul(x, inv).add_(z).round_()
        grad_x = torch.ops.aten.hardtanh_backward(grad, levels, q_min - 0.5, q_max + 0.5)  # levels are integers
        if not ctx.needs_input_grad[1]:  # a frozen step size
            return grad_x, None, None, None, None, None, None
        levels.clamp_(q_min, q_max).sub_(z)  # q - z
        if axis is None:
            grad = grad.contiguous()
            total = torch.dot(grad.reshape(-1), levels.reshape(-1)) - inv * torch.dot(grad_x.reshape(-1), x.reshape(-1))
            grad_step = (total * grad_factor).reshape(step_shape)
        else:
            dims = [d for d in range(x.dim()) if d != axis]
            per_element = levels.mul_(grad).sub_(grad_x * x * inv)
            grad_step = (per_element.sum(dims) * grad_factor).reshape(step_shape)
        return grad_x, grad_step, None, None, None, None, None


def learned_step_quantize(
    x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, q_min: int, q_max: int,
    grad_factor: float, axis: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """LSQ fake quantization with a trainable step size ``step`` (per tensor, or per channel along ``axis``).

    ``zero`` is the integer offset in torch's convention (``q = round(x / step + zero)``), held fixed;
    ``grad_factor`` scales the step's gradient (LSQ: ``1 / sqrt(numel * q_max)``). CUDA runs torch's
    fused ``_fake_quantize_learnable_*`` kernels, the CPU a vectorised equivalent.
    """
    if x.is_cuda:
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, step.reshape(1), zero.reshape(1).float(), q_min, q_max, grad_factor
            )
        return torch._fake_quantize_learnable_per_channel_affine(x, step, zero.float(), axis, q_min, q_max, grad_factor)
    return _LearnedStepSTE.apply(x, step, zero, q_min, q_max, grad_factor, axis)


def lsq_grad_factor(numel: int, q_max: int) -> float:
    """LSQ's step-size gradient scale ``1 / sqrt(numel * q_max)``."""
    return 1.0 / math.sqrt(max(numel * q_max, 1))


class FakeLinearQuantization(nn.Module):
    """Fake-quantizes its input over a range tracked with a bias-corrected EMA of batch min/max.

    Training: each call folds the batch min/max into the EMA (unless ``observe`` is off) and
    recomputes scale and zero point; eval: the frozen values are used. Before the first update
    the input passes through unchanged (there is no range yet). Under ``torch.distributed`` the
    batch min/max are reduced over ranks first, so every rank tracks the same range.

    With ``learned_step=True`` (LSQ) the EMA only provides the starting point: the first
    quantized training call sets the trainable step size ``step`` to ``1 / scale`` of the tracked
    range (zero point fixed from then on), and from there on the step is learned by gradient
    descent with LSQ's gradient scale ``1 / sqrt(numel * q_max)``; the range is no longer tracked.

    On the CPU the scalar bookkeeping runs on the host in float32 (no tensor op for two numbers);
    on CUDA it stays on the device, without host synchronisation. Both give the same bits.

    Example::

        fq = FakeLinearQuantization(num_bits=8, mode="asymmetric_unsigned")
        y = fq(torch.relu(x))       # training: updates the range, returns x fake-quantized

    Args:
        num_bits: bit width, 2..16.
        mode: ``"symmetric"``, ``"symmetric_restricted"``, ``"asymmetric_unsigned"`` or ``"asymmetric_signed"``.
        ema_decay: EMA decay in ``[0, 1)``.
        dequantize: return dequantized values (the only mode that trains; False returns levels).
        learned_step: LSQ: learn the step size, starting from the tracked range.
    """

    def __init__(
        self, num_bits: int = 8, mode: str = "symmetric", ema_decay: float = 0.999, dequantize: bool = True,
        learned_step: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_bits = check_number("num_bits", num_bits, low=2, high=16, integer=True)
        self.mode = LinearQuantMode(check_choice("mode", mode, MODES))
        self.ema_decay = check_number("ema_decay", ema_decay, low=0, high=1, high_open=True)
        self.dequantize = check_bool("dequantize", dequantize)
        self.learned_step = check_bool("learned_step", learned_step)
        if learned_step and not dequantize:
            raise ValueError("learned_step=True needs dequantize=True (the step size is learned through the dequantized output)")
        self.enabled = True  # False: pass-through (ranges may still be observed)
        self.label = "FakeLinearQuantization"  # named in errors; EMAFakeQuantizer sets "<module> input"
        self.observe = True  # False: ranges frozen, also in training
        self.register_buffer("tracked_biased", torch.zeros(2, dtype=torch.float32))  # EMA of batch [min, max], not bias-corrected
        self.register_buffer("tracked", torch.zeros(2, dtype=torch.float32))  # bias-corrected [min, max]
        self.register_buffer("iter_count", torch.zeros((), dtype=torch.float32))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.float32))
        self.register_buffer("clamp_range", torch.zeros(2, dtype=torch.float32))  # [low, high] the input is clamped to
        if learned_step:
            self.step = nn.Parameter(torch.ones((), dtype=torch.float32))
            self.register_buffer("step_initialized", torch.zeros((), dtype=torch.float32))
        self.lsq_range = lsq_range(num_bits, self.mode)
        self._invalidate()
        self._make_constants()

    tracked_min = property(lambda self: self.tracked[0])
    tracked_max = property(lambda self: self.tracked[1])
    tracked_min_biased = property(lambda self: self.tracked_biased[0])
    tracked_max_biased = property(lambda self: self.tracked_biased[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in HALF_DTYPES:  # levels in float16 / bfloat16 would be off: float32 math, rounded once
            return self._forward(x.float()).to(x.dtype)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.learned_step and self._learning():
            return self._learned(x) if self.enabled else x
        if self.training and self.observe:
            self.update_range(x)
        if not self.enabled or not self.has_range:  # no range yet: pass-through
            return x
        if self.learned_step and self.training:  # first quantized training call: the step starts from the range
            self.init_step()
            return self._learned(x)
        if not self.dequantize:
            low, high = self.clamp_range[0], self.clamp_range[1]
            return torch.round(self.scale * torch.clamp(x, low, high) - self.zero_point)
        if x.is_cuda:
            low, high = self.clamp_range[0], self.clamp_range[1]
            return fused_fake_quantize(x, self.scale, self.zero_point, low, high, self.num_bits, self.mode)
        return _PerTensorSTE.apply(x, self._host_plan())

    # ----------------------------------------------------------------------------- state
    # The buffers are the single source of truth. On the CPU every forward reads them through
    # numpy views (a few hundred nanoseconds, no torch dispatch, no sync), re-made whenever a buffer
    # is replaced (a copy of the module, ``.to()``, a load); derived values (the clamp plan) are
    # recomputed whenever the values they come from differ, so writes that bypass version counters
    # (``param.data.copy_`` of ``WeightAveraging``, numpy) are seen too. On CUDA the kernels read the
    # buffers themselves; only the step count is kept on the host, keyed by the buffers' identity and
    # version, so that no step waits for a device sync.
    @property
    def has_range(self) -> bool:
        """Whether a range was tracked (``iter_count > 0``)."""
        return self._steps() > 0

    @property
    def _mirrored(self) -> tuple[torch.Tensor, ...]:
        buffers = (self.tracked_biased, self.tracked, self.iter_count, self.scale, self.zero_point, self.clamp_range)
        return (*buffers, self.step_initialized) if self.learned_step else buffers

    def _views(self) -> tuple[np.ndarray, ...] | None:
        """numpy views of the CPU buffers, in :attr:`_mirrored` order (None off the CPU)."""
        buffers = self._mirrored
        if buffers[0].device.type != "cpu":
            return None
        host = self._host
        ptrs = tuple(t.data_ptr() for t in buffers)
        if host.ptrs != ptrs:
            host.ptrs, host.views = ptrs, tuple(t.detach().numpy() for t in buffers)
        return host.views

    def _device_state(self) -> _HostState:
        """Host copies for buffers off the CPU, valid for the buffers' identity and versions."""
        host = self._host
        key = tuple(v for t in self._mirrored for v in (t.data_ptr(), t._version))
        if host.key != key:
            host = self._host = _HostState(self.ema_decay)
            host.key = key
        return host

    def _steps(self) -> int:
        views = self._views()
        if views is not None:
            return int(views[2][()])
        host = self._device_state()
        if host.step is None:
            host.step = int(self.iter_count.item())
        return host.step

    def _learning(self) -> bool:
        views = self._views()
        if views is not None:
            return bool(views[6][()])
        host = self._device_state()
        if host.learned_ready is None:
            host.learned_ready = bool(self.step_initialized.item())
        return host.learned_ready

    def _invalidate(self) -> None:
        """Forget the host copies; they are re-read from the buffers when next needed."""
        self._host = _HostState(self.ema_decay)

    def _host_plan(self) -> tuple[float, ...]:
        views = self._views()
        values = (float(views[3][()]), float(views[4][()]), float(views[5][0]), float(views[5][1]))
        host = self._host
        if host.plan is None or host.plan_values != values:
            host.plan, host.plan_values = per_tensor_plan(*values), values
        return host.plan

    @torch.no_grad()
    def set_range(self, min_val: float, max_val: float, observations: int = 1) -> None:
        """Set the tracked range to ``[min_val, max_val]`` (e.g. from calibration), counted as
        ``observations`` batches: the EMA then continues from it with that weight (the biased
        value is ``range * (1 - d^observations)``, so the bias-corrected range is exactly the one
        given). With ``learned_step`` the step size starts from this range right away."""
        if not min_val <= max_val:
            raise ValueError(f"set_range needs min_val <= max_val; got {min_val}, {max_val}")
        check_number("observations", observations, low=1, integer=True)
        self.tracked.copy_(torch.tensor([float(min_val), float(max_val)]))
        self.tracked_biased.copy_(self.tracked * (1 - self.ema_decay**observations))
        self.iter_count.fill_(observations)
        self._update_params()
        self._invalidate()
        if self.learned_step:
            self.init_step()

    @torch.no_grad()
    def update_range(self, x: torch.Tensor) -> None:
        """Fold the batch min/max into the EMA and recompute scale, zero point and clamp range.

        Runs every training step for every quantizer, hence the host arithmetic on the CPU and
        the few fused in-place ops on CUDA.
        """
        mn, mx = torch.aminmax(x.detach())
        current = None
        if dist.is_available() and dist.is_initialized():
            current = torch.stack([-mn, mx]).float()
            dist.all_reduce(current, op=dist.ReduceOp.MAX)  # every rank: global min and max
            current[0].neg_()
        if not self.iter_count.is_cpu:
            step, learned = self._steps() + 1, self._host.learned_ready
            self._update_on_device(current if current is not None else torch.stack([mn, mx]).float(), step)
            host = self._device_state()  # what the device now holds, known without a host sync
            host.step, host.learned_ready = step, learned
            return
        lo, hi = current.tolist() if current is not None else (mn.item(), mx.item())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise FloatingPointError(
                f"{self.label}: the batch holds non-finite values (min {lo}, max {hi}); the range was not "
                "updated. The model diverged or the data holds NaN/Inf: check the loss, the learning rate "
                "and the inputs (Trainer(detect_anomaly=True) finds the first op that produced them)"
            )
        self._update_on_host(lo, hi, self._steps() + 1)

    def _update_on_device(self, current: torch.Tensor, step: int) -> None:
        """Device-side update, no host sync; a batch with NaN/Inf leaves the EMA as it was (raising
        would need a sync: the CPU path raises)."""
        self.iter_count.fill_(step)
        updated = torch.lerp(self.tracked_biased, current, 1 - self.ema_decay)  # biased * d + (1 - d) * current
        self.tracked_biased.copy_(torch.where(torch.isfinite(current).all(), updated, self.tracked_biased))
        torch.div(self.tracked_biased, 1 - self.ema_decay**step, out=self.tracked)
        self._update_params()

    def _update_on_host(self, lo: float, hi: float, step: int) -> None:
        biased_view, tracked_view, iter_count, scale, zero_point, clamp_range = self._views()[:6]
        # torch's lerp_(current, w): fma(w, current - biased, biased) for w < 0.5, else
        # fma(-(1 - w), current - biased, current), the difference in float32; the double product
        # of two float32 numbers is exact, so one rounding remains, as in the fused multiply-add
        weight, biased = self._host.weight, [float(biased_view[0]), float(biased_view[1])]
        for i, current in enumerate((f32(lo), f32(hi))):
            diff = f32(current - biased[i])
            biased[i] = f32(weight * diff + biased[i]) if weight < 0.5 else f32(current - (1.0 - weight) * diff)
        correction = f32(1 - self.ema_decay**step)
        tracked_min, tracked_max = f32(biased[0] / correction), f32(biased[1] / correction)
        params = host_quant_params(self.num_bits, self.mode, tracked_min, tracked_max)
        biased_view[0], biased_view[1] = biased
        tracked_view[0], tracked_view[1] = tracked_min, tracked_max
        iter_count[()] = step
        scale[()], zero_point[()], clamp_range[0], clamp_range[1] = params

    def _update_params(self) -> None:
        if self.mode in (LinearQuantMode.SYMMETRIC, LinearQuantMode.SYMMETRIC_RESTRICTED):
            max_abs = self.tracked.abs().amax()
            torch.mul(self._signs, max_abs, out=self.clamp_range)
            width = max_abs
        else:
            torch.clamp(self.tracked, self._low_bounds, self._high_bounds, out=self.clamp_range)  # include 0
            width = self.clamp_range[1] - self.clamp_range[0]
            torch.round(self._levels / width.clamp(min=_TINY) * self.clamp_range[0], out=self.zero_point)
        # a zero-width range gets scale 1 (Distiller); torch.where keeps it free of host syncs
        torch.where(width > 0, self._levels / width.clamp(min=_TINY), self._one, out=self.scale)
        if self._zero_offset:
            self.zero_point.add_(self._zero_offset)

    # ----------------------------------------------------------------------------- LSQ
    @torch.no_grad()
    def init_step(self) -> None:
        """Start the learned step size from the tracked range: ``step = 1 / scale``."""
        if not self.learned_step:
            raise RuntimeError("init_step() needs FakeLinearQuantization(learned_step=True)")
        self.step.copy_(1 / self.scale)
        self.step_initialized.fill_(1)

    def _learned(self, x: torch.Tensor) -> torch.Tensor:
        check_finite_step(self.step, self.label)
        with torch.no_grad():
            self.step.clamp_(min=_MIN_STEP)  # an optimizer step must not make it zero or negative
        q_min, q_max = self.lsq_range
        zero = -self.zero_point  # torch's convention: q = round(x / step + zero)
        return learned_step_quantize(x, self.step, zero, q_min, q_max, lsq_grad_factor(x.numel(), q_max))

    # ----------------------------------------------------------------------------- plumbing
    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._invalidate()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> FakeLinearQuantization:
        apply_keeping_float32(self, super()._apply, fn, *args, **kwargs)
        self._invalidate()
        self._make_constants()  # follow the buffers' device
        return self

    def _make_constants(self) -> None:
        symmetric = self.mode in (LinearQuantMode.SYMMETRIC, LinearQuantMode.SYMMETRIC_RESTRICTED)
        n = (2**self.num_bits - 1) / 2 if self.mode == LinearQuantMode.SYMMETRIC else 2 ** (self.num_bits - 1) - 1
        device = self.tracked.device
        self._levels = torch.tensor(n if symmetric else 2**self.num_bits - 1.0, dtype=torch.float32, device=device)
        self._signs = torch.tensor([-1.0, 1.0], dtype=torch.float32, device=device)
        self._low_bounds = torch.tensor([-float("inf"), 0.0], dtype=torch.float32, device=device)
        self._high_bounds = torch.tensor([0.0, float("inf")], dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._zero_offset = 2.0 ** (self.num_bits - 1) if self.mode == LinearQuantMode.ASYMMETRIC_SIGNED else 0.0

    def extra_repr(self) -> str:
        lsq = ", learned_step=True" if self.learned_step else ""
        return f"num_bits={self.num_bits}, mode={self.mode.value}, ema_decay={self.ema_decay}{lsq}"


_MIN_STEP = 1e-8


def check_finite_step(step: torch.Tensor, label: str) -> None:
    """``FloatingPointError`` naming the quantizer when an LSQ step size is NaN / Inf (an update
    from a NaN loss or gradient); read through a numpy view on the CPU (no dispatch), skipped on
    other devices, where the Lightning callback checks every step instead (no sync per forward)."""
    if step.is_cpu and not np.isfinite(step.detach().numpy()).all():
        raise FloatingPointError(
            f"{label}: its LSQ step size is NaN or Inf (an optimizer step from a NaN loss or gradient). The model "
            "diverged: check the loss and the learning rates (Trainer(detect_anomaly=True) finds the first op)"
        )


def apply_keeping_float32(module: nn.Module, apply: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
    """``module._apply`` through ``apply`` (the base class's), but the module's own float32
    parameters and buffers keep float32 and their exact values when ``fn`` changes dtypes
    (``model.half()``, ``.to(torch.bfloat16)``, ``.double()``, Lightning's ``precision="bf16-true"``):
    quantizer state (ranges, scales, step sizes) in half precision would put the grid off by a few
    percent, and Adam's updates of a step size would vanish below its ulp. Devices still follow."""
    before = {name: t.detach() for name, t in (*module._parameters.items(), *module._buffers.items())
              if t is not None and t.dtype == torch.float32}  # fmt: skip
    apply(fn, *args, **kwargs)
    for name, original in before.items():
        container = module._parameters if name in module._parameters else module._buffers
        now = container[name]
        if now is None or now.dtype == torch.float32:
            continue
        restored = original.to(device=now.device)
        if isinstance(now, nn.Parameter):
            now.data = restored
        else:
            container[name] = restored


class _HostState:
    """What a :class:`FakeLinearQuantization` keeps on the host: numpy views of its CPU buffers
    (for the buffers at ``ptrs``), the clamp plan of the values ``plan_values``, and, off the CPU,
    the step count for the buffers' identity and versions ``key`` (None: re-read)."""

    __slots__ = ("ptrs", "views", "weight", "plan", "plan_values", "key", "step", "learned_ready")

    def __init__(self, ema_decay: float = 0.0) -> None:
        self.ptrs: tuple[int, ...] = ()
        self.views: tuple[np.ndarray, ...] = ()
        self.weight = f32(1 - ema_decay)  # the EMA's lerp weight, in float32 as torch uses it
        self.plan: tuple[float, ...] | None = None
        self.plan_values: tuple[float, ...] = ()
        self.key: tuple[int, ...] = ()
        self.step: int | None = None
        self.learned_ready: bool | None = None


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
    symmetric = mode in (LinearQuantMode.SYMMETRIC, LinearQuantMode.SYMMETRIC_RESTRICTED)
    with torch.no_grad():
        mn, mx = channel_min_max(w, axis)
        if symmetric and not w.is_cuda:
            # Distiller's symmetric scale in three ops; an all-zero channel gets a huge scale
            # instead of 1, which quantizes it to zeros all the same
            n = (2**num_bits - 1) / 2 if mode == LinearQuantMode.SYMMETRIC else 2 ** (num_bits - 1) - 1
            scale = torch.maximum(mn.float().neg_(), mx.float()).clamp_(min=_TINY).reciprocal_().mul_(n)
            zero_point = low = high = None
        else:
            scale, zero_point, low, high = linear_quant_params(num_bits, mode, mn.float(), mx.float())
    if w.is_cuda:
        return fused_fake_quantize(w, scale, zero_point, low, high, num_bits, mode, axis)
    shape = _broadcast_shape(w, axis)
    zero_point = None if symmetric else zero_point.reshape(shape).to(w.dtype)
    return _RoundSTE.apply(w, scale.reshape(shape).to(w.dtype), zero_point, symmetric)


class _WeightQuantizer(nn.Module):
    """What both weight quantizers share: options, the ``enabled`` switch, and a buffer flag
    (``_flag``) that says whether the quantizer holds learned or calibrated state, read once."""

    _flag = ""

    def __init__(self, channels: int | None, num_bits: int, mode: str, axis: int | None) -> None:
        super().__init__()
        self.num_bits = check_number("num_bits", num_bits, low=2, high=16, integer=True)
        self.mode = LinearQuantMode(check_choice("mode", mode, MODES))
        if (channels is None) != (axis is None):
            raise ValueError(f"channels and axis must both be set (per channel) or both be None; got {channels=}, {axis=}")
        self.axis = axis
        self.param_shape = () if channels is None else (channels,)
        self.register_buffer(self._flag, torch.zeros((), dtype=torch.float32))
        self.enabled = True  # False: the float weight passes through (e.g. during calibration)
        self.label = type(self).__name__  # named in errors; EMAFakeQuantizer sets "weight quantizer (<weight>)"
        self._ready: tuple[tuple[int, int], bool] | None = None  # (flag buffer identity and version, value)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> _WeightQuantizer:
        apply_keeping_float32(self, super()._apply, fn, *args, **kwargs)
        return self

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if weight.dtype in HALF_DTYPES:  # float32 math, rounded once into the weight's dtype
            return self._quantize(weight.float()).to(weight.dtype)
        return self._quantize(weight)

    def _quantize(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _has_state(self) -> bool:
        """The flag buffer's value: read through a numpy view on the CPU (any write is seen), once
        per identity and version of the buffer elsewhere (no device sync per step)."""
        flag = getattr(self, self._flag)
        if flag.is_cpu:
            return bool(flag.detach().numpy()[()])
        key = (flag.data_ptr(), flag._version)
        if self._ready is None or self._ready[0] != key:
            self._ready = (key, bool(flag.item()))
        return self._ready[1]

    def _mark_ready(self) -> None:
        getattr(self, self._flag).fill_(1)


class LearnedStepWeight(_WeightQuantizer):
    """LSQ for a weight: a trainable step size per output channel (or one per tensor).

    The first training call starts the step from the weight's current range (``step = 1 / scale``
    of Distiller's parameters, zero point fixed from then on); before that, and in eval before
    any training, the weight is fake-quantized over its own range like the EMA mode does.

    Args:
        channels: number of output channels, or None for one step size per tensor.
        num_bits, mode: as for :class:`FakeLinearQuantization`.
        axis: output-channel axis of the weight (None with ``channels=None``).
    """

    _flag = "initialized"

    def __init__(self, channels: int | None, num_bits: int = 8, mode: str = "symmetric", axis: int | None = 0) -> None:
        super().__init__(channels, num_bits, mode, axis)
        self.step = nn.Parameter(torch.ones(self.param_shape, dtype=torch.float32))
        self.register_buffer("zero", torch.zeros(self.param_shape, dtype=torch.float32))  # torch's convention: q = round(w / step + zero)
        self.lsq_range = lsq_range(num_bits, self.mode)

    @torch.no_grad()
    def init_step(self, weight: torch.Tensor) -> None:
        """Start the step size (and fix the zero point) from ``weight``'s current range."""
        mn, mx = channel_min_max(weight.float(), self.axis)
        scale, zero_point, _, _ = linear_quant_params(self.num_bits, self.mode, mn, mx)
        self.step.copy_(1 / scale)
        self.zero.copy_(-zero_point)
        self._mark_ready()

    def _quantize(self, weight: torch.Tensor) -> torch.Tensor:
        if not self._has_state():
            if not self.training:
                return weight_fake_quantize(weight, self.num_bits, self.mode, self.axis)
            self.init_step(weight)
        check_finite_step(self.step, self.label)
        with torch.no_grad():
            self.step.clamp_(min=_MIN_STEP)
        q_min, q_max = self.lsq_range
        grad_factor = lsq_grad_factor(weight.numel(), q_max)
        return learned_step_quantize(weight, self.step, self.zero, q_min, q_max, grad_factor, self.axis)

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, mode={self.mode.value}, axis={self.axis}, channels={self.step.numel()}"


class WeightRange(_WeightQuantizer):
    """A calibrated clipping of a weight's range (per output channel or per tensor).

    Until calibrated it behaves like the plain EMA mode (the weight's current range). Calibration
    (:func:`~qat_lightning.core.calibrate.calibrate_weights`) stores ``clip_ratio = amax / max|w|``
    per channel; from then on the range is the current one clipped to ``[-a, a]`` with
    ``a = clip_ratio * max|w|`` of the current weight (entries beyond get gradient 0). Relative,
    so that the clipping follows weights that keep training (from scratch they grow several-fold;
    an absolute ``amax`` would freeze them at their initial size); for a pretrained model that is
    fine-tuned the two agree. :meth:`amax` gives the current clipping value.
    """

    _flag = "calibrated"

    def __init__(self, channels: int | None, num_bits: int = 8, mode: str = "symmetric", axis: int | None = 0) -> None:
        super().__init__(channels, num_bits, mode, axis)
        self.register_buffer("clip_ratio", torch.ones(self.param_shape, dtype=torch.float32))

    @torch.no_grad()
    def set_amax(self, amax: torch.Tensor | float, weight: torch.Tensor) -> None:
        """Clip ``weight`` at ``amax`` (one value or one per channel) now, and proportionally later."""
        mn, mx = channel_min_max(weight, self.axis)
        largest = torch.maximum(mn.abs(), mx.abs()).float()
        amax = torch.as_tensor(amax, dtype=torch.float32, device=largest.device).expand_as(largest)
        ratio = torch.where(largest > 0, (amax / largest.clamp(min=_TINY)).clamp(max=1), torch.ones_like(largest))
        self.clip_ratio.copy_(ratio)
        self._mark_ready()

    @torch.no_grad()
    def amax(self, weight: torch.Tensor) -> torch.Tensor:
        """The clipping value for ``weight`` as it is now."""
        mn, mx = channel_min_max(weight, self.axis)
        return torch.maximum(mn.abs(), mx.abs()).float() * self.clip_ratio

    @torch.no_grad()
    def quant_params(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distiller's ``(scale, zero_point, low, high)`` of ``weight``'s current range, clipped."""
        mn, mx = channel_min_max(weight, self.axis)
        mn, mx = mn.float(), mx.float()
        amax = torch.maximum(mn.abs(), mx.abs()) * self.clip_ratio
        return linear_quant_params(self.num_bits, self.mode, torch.maximum(mn, -amax), torch.minimum(mx, amax))

    def _quantize(self, weight: torch.Tensor) -> torch.Tensor:
        if not self._has_state():
            return weight_fake_quantize(weight, self.num_bits, self.mode, self.axis)
        return fake_quantize(weight, *self.quant_params(weight), self.num_bits, self.mode, self.axis)

    def extra_repr(self) -> str:
        return f"num_bits={self.num_bits}, mode={self.mode.value}, axis={self.axis}, channels={self.clip_ratio.numel()}"


@torch.no_grad()
def set_learned_step_from_amax(module: LearnedStepWeight, amax: torch.Tensor) -> None:
    """Start a :class:`LearnedStepWeight` from a calibrated clipping value (symmetric: ``amax / q_max``)."""
    q_min, q_max = module.lsq_range
    amax = torch.as_tensor(amax, dtype=torch.float32, device=module.step.device).expand_as(module.step)
    if module.mode in (LinearQuantMode.SYMMETRIC, LinearQuantMode.SYMMETRIC_RESTRICTED):
        module.step.copy_(amax.clamp(min=_MIN_STEP) / q_max)
        module.zero.zero_()
    else:  # the range [-amax, amax] on the unsigned / signed-offset grid
        module.step.copy_((2 * amax).clamp(min=_MIN_STEP) / (q_max - q_min))
        module.zero.copy_(torch.round(q_min + amax / module.step))
    module._mark_ready()


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
