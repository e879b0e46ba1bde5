"""Calibration of fake-quant ranges from histograms (ModelOpt style), for QAT start or PTQ.

* :func:`calibrate` runs batches through a model prepared by :class:`EMAFakeQuantizer` with
  quantization off, histograms every activation quantizer's input and sets its range from the
  chosen method (``entropy`` / ``mse`` / ``percentile`` / ``max``); the EMA then continues from
  there (LSQ step sizes start from it). Weights are calibrated too (:func:`calibrate_weights`).
* :func:`calibrate_weights` sets each weight quantizer's clipping value ``amax`` from the
  histogram of the weight, per output channel (axis 1 for transposed convolutions).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._validate import check_bool, check_choice, check_number
from ..quantizers.activation import FakeLinearQuantization
from ..quantizers.factory import FormatQuantizer
from ..quantizers.weight import LearnedStepWeight, WeightRange, set_learned_step_from_amax
from .histogram import MAX_BINS, METHODS, HistogramCalibrator

WEIGHT_METHODS = ("max", "mse", "percentile")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed a batch to the model: a tensor as is, the first element of a tuple/list (inputs, targets),
    a dict as keyword arguments."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise ValueError(f"cannot feed a batch of type {type(batch).__name__} to the model: pass forward_fn=(model, batch) -> output")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    method: str = "entropy",
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    num_bins: int = 2048,
    percentile: float = 99.99,
    stride: int = 1,
    start_bin: int = 128,
    weights: bool = True,
    weight_method: str = "percentile",
    device: torch.device | str | None = None,
) -> dict[str, tuple[float, float]]:
    """Set every activation quantizer's range (and weight ``amax``) of a prepared model from histograms.

    The model runs in eval mode without gradients and with every fake quantizer off, on up to
    ``num_batches`` batches of ``data`` (all if None). For each quantizer the histogram of ``|x|``
    gives ``amax`` by ``method``; the range becomes ``[max(min x, -amax), min(max x, amax)]``
    (``unsigned`` levels for the search when ``min x >= 0``), counted as that many batches of EMA.
    Under ``torch.distributed`` the ranges are reduced over ranks (widest), so all ranks agree.
    Returns the ranges by quantizer name. The model's train/eval mode is restored.
    """
    check_choice("method", method, (*METHODS, "max"))
    if num_batches is not None:
        check_number("num_batches", num_batches, low=1, integer=True)
    check_number("percentile", percentile, low=0, high=100, low_open=True)
    check_number("num_bins", num_bins, low=2, high=MAX_BINS, integer=True)
    check_bool("weights", weights)
    check_choice("weight_method", weight_method, WEIGHT_METHODS)
    forward_fn = forward_fn or default_forward
    activations = {name: m for name, m in model.named_modules() if isinstance(m, FakeLinearQuantization)}
    weight_quantizers = [m for m in model.modules() if isinstance(m, (WeightRange, LearnedStepWeight))]
    if not activations and not weight_quantizers:
        dynamic = any(isinstance(m, FormatQuantizer) for m in model.modules())
        raise ValueError(
            "calibrate(): the model's quantizers use formats whose scales come from each tensor: there is no range to calibrate"
            if dynamic else "calibrate(): the model has no fake quantizers; prepare it with EMAFakeQuantizer(...).prepare() (or EMAFakeQuant) first"
        )

    calibrators = {name: HistogramCalibrator(num_bits=fq.num_bits, num_bins=num_bins) for name, fq in activations.items()}
    extremes: dict[str, list[float]] = {name: [float("inf"), -float("inf")] for name in activations}
    saved = [(fq, fq.enabled, fq.observe) for fq in activations.values()]
    saved_weights = [(m, m.enabled) for m in weight_quantizers]
    modes = {m: m.training for m in model.modules()}
    handles = []
    for name, fq in activations.items():
        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach()
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f"calibrate(): NaN or Inf reaches the activation quantizer {name!r} (batch {batches}); no range was set. "
                    "Check the calibration data and the model (it may have diverged)"
                )
            calibrators[name].collect(x)
            lo, hi = torch.aminmax(x)
            extremes[name][0] = min(extremes[name][0], lo.item())
            extremes[name][1] = max(extremes[name][1], hi.item())

        handles.append(fq.register_forward_pre_hook(hook))
        fq.enabled, fq.observe = False, False
    for m in weight_quantizers:
        m.enabled = False
    batches = 0
    try:
        model.eval()
        for batch in data:
            if num_batches is not None and batches >= num_batches:
                break
            forward_fn(model, _to_device(batch, device))
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for fq, enabled, observe in saved:
            fq.enabled, fq.observe = enabled, observe
        for m, enabled in saved_weights:
            m.enabled = enabled
        for m, training in modes.items():
            m.training = training
    if batches == 0:
        raise ValueError("calibrate(): the data gave no batches (empty calibration)")

    ranges: dict[str, tuple[float, float]] = {}
    for name, fq in activations.items():
        calibrator, (lo, hi) = calibrators[name], extremes[name]
        if calibrator.hist is None:  # the quantizer never ran (unused branch): leave it as it is
            continue
        calibrator.unsigned = lo >= 0
        amax = calibrator.compute_amax(method, stride=stride, start_bin=min(start_bin, calibrator.hist.numel() - 1), percentile=percentile).item()
        ranges[name] = (max(lo, -amax), min(hi, amax))
    ranges = _reduce_ranges(ranges)
    for name, (lo, hi) in ranges.items():
        activations[name].set_range(lo, hi, observations=batches)
    if weights and weight_quantizers:
        calibrate_weights(model, method=weight_method, percentile=percentile, num_bins=num_bins)
    return ranges


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a batch made of tensors, tuples, lists and dicts."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(b, fn) for b in batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    return batch


def _to_device(batch: Any, device: torch.device | str | None) -> Any:
    return batch if device is None else map_tensors(batch, lambda t: t.to(device))


def _reduce_ranges(ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    if not (dist.is_available() and dist.is_initialized()) or not ranges:
        return ranges
    names = sorted(ranges)
    packed = torch.tensor([[-ranges[n][0], ranges[n][1]] for n in names], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        packed = packed.cuda()
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return {n: (-packed[i, 0].item(), packed[i, 1].item()) for i, n in enumerate(names)}


@torch.no_grad()
def calibrate_weights(
    model: nn.Module, method: str = "percentile", perchannel: bool = True, percentile: float = 99.99, num_bins: int = 2048
) -> dict[str, torch.Tensor]:
    """Set the clipping value ``amax`` of every quantized weight from its histogram(s).

    EMA-mode weights (:class:`WeightRange`) keep it as a ratio to their current maximum, so the
    clipping follows weights that keep training; LSQ weights start their step sizes from it.

    Per output channel when ``perchannel`` (and the weight quantizer is per channel), else per
    tensor; ``method`` is ``"max"``, ``"mse"`` or ``"percentile"``. Weights quantized with LSQ get
    their step sizes from ``amax``. Returns ``amax`` by weight name.
    """
    check_choice("method", method, WEIGHT_METHODS)
    check_bool("perchannel", perchannel)
    check_number("percentile", percentile, low=0, high=100, low_open=True)
    check_number("num_bins", num_bins, low=2, high=MAX_BINS, integer=True)
    results: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        quantizer = module._modules.get("weight_fake_quant")
        if not isinstance(quantizer, (WeightRange, LearnedStepWeight)):
            continue
        weight = module._parameters["weight"]
        if not torch.isfinite(weight).all():
            raise FloatingPointError(f"calibrate_weights(): NaN or Inf in {name + '.weight' if name else 'weight'}; no clipping was set")
        axis = quantizer.axis if perchannel else None
        calibrator = HistogramCalibrator(num_bits=quantizer.num_bits, axis=axis, num_bins=num_bins)
        calibrator.collect(weight)
        start_bin = min(128, num_bins - 1)
        amax = calibrator.compute_amax(method, start_bin=start_bin, percentile=percentile).to(weight.device)
        if isinstance(quantizer, WeightRange):
            quantizer.set_amax(amax, weight)
        else:
            set_learned_step_from_amax(quantizer, amax)
        results[f"{name}.weight" if name else "weight"] = amax
    if not results:
        raise ValueError("calibrate_weights(): no quantized weights; prepare the model with EMAFakeQuantizer(...).prepare() first")
    return results
