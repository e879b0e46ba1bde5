"""Calibration and post-training quantization (plain torch): histogram ranges (ModelOpt),
SmoothQuant rescaling, AdaScale."""
from .adascale import AdaScaleResult, apply_adascale, find_blocks, round_to_nearest
from .calibrate import calibrate, calibrate_weights
from .histogram import HistogramCalibrator
from .rescaling import RescalingCalibrator

__all__ = [
    "AdaScaleResult", "HistogramCalibrator", "RescalingCalibrator", "apply_adascale", "calibrate", "calibrate_weights",
    "find_blocks", "round_to_nearest",
]  # fmt: skip
