"""Weight quantizers of the fake-quant transform: ``WeightRange`` (the weight's current range,
optionally clipped by calibration) and ``LearnedStepWeight`` (LSQ, one step per output channel)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._validate import check_choice, check_number
from ..formats.distiller import _TINY, MODES, LinearQuantMode, channel_min_max, fake_quantize, linear_quant_params, weight_fake_quantize
from ..formats.lsq import learned_step_quantize, lsq_grad_factor, lsq_range
from ._common import _MIN_STEP, HALF_DTYPES, apply_keeping_float32, check_finite_step, one_dimensional_step, read_flag

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
        self.sharded = False  # FSDP2: see FakeLinearQuantization.sharded
        self._pending_step: torch.Tensor | None = None
        self.label = type(self).__name__  # named in errors; EMAFakeQuantizer sets "weight quantizer (<weight>)"
        self._ready: tuple[tuple[int, int], bool] | None = None  # (flag buffer identity and version, value)
        self._known: bool | None = False  # the flag as our own writes left it (compiled forwards read this); None: re-read
        self._flag_view: tuple[int, Any] | None = None  # (data pointer, numpy view) of the CPU flag buffer

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> _WeightQuantizer:
        apply_keeping_float32(self, super()._apply, fn, *args, **kwargs)  # moves and casts keep the flag's value
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
        if torch.compiler.is_compiling():  # a host mirror (a buffer's value cannot be read in a graph)
            if self._known is None:
                self._known = read_flag(getattr(self, self._flag))  # a graph break, once after a load
            return self._known
        flag = self._buffers[self._flag]
        if flag.is_cpu:
            view = self._flag_view
            if view is None or view[0] != flag.data_ptr():  # a numpy view, re-made when the buffer is replaced
                view = self._flag_view = (flag.data_ptr(), flag.detach().numpy())
            return bool(view[1][()])
        key = (flag.data_ptr(), flag._version)
        if self._ready is None or self._ready[0] != key:
            self._ready = (key, bool(flag.item()))
        return self._ready[1]

    def _mark_ready(self) -> None:
        getattr(self, self._flag).fill_(1)
        self._known = True

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        one_dimensional_step(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = getattr(self, self._flag)
        self._known = None if flag.is_meta else bool(flag.item())


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
        self.step = nn.Parameter(torch.ones(self.param_shape or (1,), dtype=torch.float32))  # 1-D: FSDP2 cannot shard a 0-d parameter
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
        if self.sharded:  # FSDP2's gathered copy: EMAFakeQuantizer.write_back_steps puts the value into the shard
            self._pending_step = self.step.detach().clone()

    def _quantize(self, weight: torch.Tensor) -> torch.Tensor:
        if not self._has_state():
            if not self.training:
                return weight_fake_quantize(weight, self.num_bits, self.mode, self.axis)
            self.init_step(weight)
        if not self.sharded and not torch.compiler.is_compiling():  # else the Lightning callback checks after each step
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
    (:func:`~qat_lightning.calibration.calibrate.calibrate_weights`) stores ``clip_ratio = amax / max|w|``
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


