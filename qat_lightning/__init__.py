"""qat_lightning: quantization-aware training as PyTorch Lightning callbacks."""
from .callbacks import AdaScale, DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling
from .core import (
    DiffQConfig, DiffQuantizer, EMAFakeQuantizer, FakeLinearQuantization, HistogramCalibrator, RescalingCalibrator,
    apply_adascale, calibrate, calibrate_weights, round_to_nearest,
)  # fmt: skip

__all__ = [
    "AdaScale", "DiffQ", "DiffQConfig", "DiffQuantizer", "EMAFakeQuant", "EMAFakeQuantizer", "FakeLinearQuantization",
    "HistogramCalibration", "HistogramCalibrator", "Rescaling", "RescalingCalibrator", "apply_adascale", "calibrate",
    "calibrate_weights", "round_to_nearest",
]  # fmt: skip
__version__ = "0.1.0"
