"""qat_lightning: quantization-aware training as PyTorch Lightning callbacks."""
from .callbacks import DiffQ, EMAFakeQuant, HistogramCalibration, Rescaling
from .core import (
    DiffQConfig, DiffQuantizer, EMAFakeQuantizer, FakeLinearQuantization, HistogramCalibrator, RescalingCalibrator, calibrate,
    calibrate_weights,
)  # fmt: skip

__all__ = [
    "DiffQ", "DiffQConfig", "DiffQuantizer", "EMAFakeQuant", "EMAFakeQuantizer", "FakeLinearQuantization",
    "HistogramCalibration", "HistogramCalibrator", "Rescaling", "RescalingCalibrator", "calibrate", "calibrate_weights",
]  # fmt: skip
__version__ = "0.1.0"
