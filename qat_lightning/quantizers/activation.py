"""``FakeLinearQuantization``: an activation quantizer over an EMA-tracked range (Distiller), or
with a learned step size (LSQ), its state in buffers that are the single source of truth."""
from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .._validate import check_bool, check_choice, check_number
from ..formats.distiller import (
    _TINY, MODES, LinearQuantMode, _PerTensorSTE, f32, fake_quantize, fused_fake_quantize, host_quant_params, per_tensor_plan,
)  # fmt: skip
from ..formats.lsq import learned_step_quantize, lsq_grad_factor, lsq_range
from ._common import _MIN_STEP, HALF_DTYPES, apply_keeping_float32, check_finite_step, one_dimensional_step, read_flag

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
        # FSDP2 (set by EMAFakeQuantizer.rebind): the forward sees a gathered copy of the step, so no numpy
        # check of it (a view would pin the storage FSDP frees) and an initialised step is written back later
        self.sharded = False
        self._pending_step: torch.Tensor | None = None
        self.register_buffer("tracked_biased", torch.zeros(2, dtype=torch.float32))  # EMA of batch [min, max], not bias-corrected
        self.register_buffer("tracked", torch.zeros(2, dtype=torch.float32))  # bias-corrected [min, max]
        self.register_buffer("iter_count", torch.zeros((), dtype=torch.float32))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.float32))
        self.register_buffer("clamp_range", torch.zeros(2, dtype=torch.float32))  # [low, high] the input is clamped to
        if learned_step:
            self.step = nn.Parameter(torch.ones(1, dtype=torch.float32))  # 1-D: FSDP2 cannot shard a 0-d parameter
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
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        views = None if x.is_cuda or self.learned_step or not self.dequantize else self._views()
        if views is not None:  # the CPU path of every training step: the buffers read once, through numpy
            if self.training and self.observe:
                self._observe_on_host(x, views)
            if not self.enabled or views[2][()] <= 0:  # no range yet: pass-through
                return x
            return _PerTensorSTE.apply(x, self._host_plan(views))
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

    def _traced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inside a ``torch.compile``d forward: the same values in tensor ops only (the host bookkeeping
        of the eager CPU path does not trace); before the first range, ``x`` passes through."""
        if self.learned_step:
            if self._lsq_known is None:
                self._lsq_known = read_flag(self.step_initialized)  # a graph break, once after a load
            if self._lsq_known:
                return self._learned(x) if self.enabled else x
        if self.training and self.observe:
            self._traced_update(x)
        if not self.enabled:
            return x
        if self.learned_step and self.training and self.observe:  # the range was just updated: the step starts from it
            self.init_step()
            return self._learned(x)
        low, high = self.clamp_range[0], self.clamp_range[1]
        if not self.dequantize:
            quantized = torch.round(self.scale * torch.clamp(x, low, high) - self.zero_point)
        else:
            quantized = fake_quantize(x, self.scale, self.zero_point, low, high, self.num_bits, self.mode)
        return torch.where(self.iter_count > 0, quantized, x)

    @torch.no_grad()
    def _traced_update(self, x: torch.Tensor) -> None:
        """:meth:`update_range` in tensor ops: the device path, its step count read from the buffer
        (a batch with NaN/Inf leaves the EMA as it was: raising needs the host, as on CUDA)."""
        mn, mx = torch.aminmax(x.detach())
        current = self._global_range(mn, mx)
        self._update_on_device(current if current is not None else torch.stack([mn, mx]).float(), self.iter_count + 1)

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
        return (_LSQ_BUFFERS if self.learned_step else _BUFFERS)(self._buffers)  # straight from the dict: no __getattr__

    def _views(self) -> tuple[np.ndarray, ...] | None:
        """numpy views of the CPU buffers, in :attr:`_mirrored` order (None off the CPU)."""
        buffers = self._mirrored
        if not buffers[0].is_cpu:
            return None
        host = self._host
        ptrs = tuple(map(_DATA_PTR, buffers))
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
        """Forget the host copies; they are re-read from the buffers when next needed (the LSQ flag
        that compiled forwards read: now, as this runs eagerly)."""
        self._host = _HostState(self.ema_decay)
        flag = getattr(self, "step_initialized", None)
        self._lsq_known = None if flag is None or flag.is_meta else bool(flag.item())

    def _host_plan(self, views: tuple[np.ndarray, ...] | None = None) -> tuple[float, ...]:
        views = self._views() if views is None else views
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
        current = self._global_range(mn, mx)
        if not self.iter_count.is_cpu:
            step, learned = self._steps() + 1, self._host.learned_ready
            self._update_on_device(current if current is not None else torch.stack([mn, mx]).float(), step)
            host = self._device_state()  # what the device now holds, known without a host sync
            host.step, host.learned_ready = step, learned
            return
        self._observe_on_host(x, self._views(), mn, mx, current)

    def _observe_on_host(
        self, x: torch.Tensor, views: tuple[np.ndarray, ...], mn: torch.Tensor | None = None, mx: torch.Tensor | None = None,
        current: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """:meth:`update_range` on the CPU: the batch min / max folded into the EMA in host float32."""
        if mn is None:
            mn, mx = torch.aminmax(x.detach())
            current = self._global_range(mn, mx)
        lo, hi = current.tolist() if current is not None else (mn.item(), mx.item())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise FloatingPointError(
                f"{self.label}: the batch holds non-finite values (min {lo}, max {hi}); the range was not "
                "updated. The model diverged or the data holds NaN/Inf: check the loss, the learning rate "
                "and the inputs (Trainer(detect_anomaly=True) finds the first op that produced them)"
            )
        self._update_on_host(lo, hi, int(views[2][()]) + 1, views)

    @staticmethod
    def _global_range(mn: torch.Tensor, mx: torch.Tensor) -> torch.Tensor | None:
        """``[min, max]`` over every rank under ``torch.distributed`` (float32), else None."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        current = torch.stack([-mn, mx]).float()
        dist.all_reduce(current, op=dist.ReduceOp.MAX)  # every rank: global min and max
        current[0].neg_()
        return current

    def _update_on_device(self, current: torch.Tensor, step: int | torch.Tensor) -> None:
        """Device-side update, no host sync; a batch with NaN/Inf leaves the EMA as it was (raising
        would need a sync: the CPU path raises). ``step``: the new count, a host integer, or a
        0-d tensor inside a compiled forward (its bias correction in float64, as the host computes it)."""
        self.iter_count.fill_(step)
        updated = torch.lerp(self.tracked_biased, current, 1 - self.ema_decay)  # biased * d + (1 - d) * current
        self.tracked_biased.copy_(torch.where(torch.isfinite(current).all(), updated, self.tracked_biased))
        if isinstance(step, torch.Tensor):
            correction = (1 - torch.pow(self.ema_decay, step.double())).float()
        else:
            correction = 1 - self.ema_decay**step
        torch.div(self.tracked_biased, correction, out=self.tracked)
        self._update_params()

    def _update_on_host(self, lo: float, hi: float, step: int, views: tuple[np.ndarray, ...]) -> None:
        biased_view, tracked_view, iter_count, scale, zero_point, clamp_range = views[:6]
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
        self._lsq_known = True
        if self.sharded:  # the step here is FSDP2's gathered copy: write_back_steps puts the value into the shard
            self._pending_step = self.step.detach().clone()

    def _learned(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sharded and not torch.compiler.is_compiling():  # else the Lightning callback checks after each step
            check_finite_step(self.step, self.label)
        with torch.no_grad():
            self.step.clamp_(min=_MIN_STEP)  # an optimizer step must not make it zero or negative
        q_min, q_max = self.lsq_range
        zero = -self.zero_point  # torch's convention: q = round(x / step + zero)
        return learned_step_quantize(x, self.step, zero, q_min, q_max, lsq_grad_factor(x.numel(), q_max))

    # ----------------------------------------------------------------------------- plumbing
    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        one_dimensional_step(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
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


_BUFFERS = operator.itemgetter("tracked_biased", "tracked", "iter_count", "scale", "zero_point", "clamp_range")
_LSQ_BUFFERS = operator.itemgetter("tracked_biased", "tracked", "iter_count", "scale", "zero_point", "clamp_range", "step_initialized")
_DATA_PTR = torch.Tensor.data_ptr


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


